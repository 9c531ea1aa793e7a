"""neuralign.optim"""
