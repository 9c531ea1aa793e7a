"""neuralign.curves"""
