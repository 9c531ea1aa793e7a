"""neuralign.experiments"""
