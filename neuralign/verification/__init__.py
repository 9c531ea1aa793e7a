"""neuralign.verification"""
