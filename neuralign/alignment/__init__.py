"""neuralign.alignment"""
