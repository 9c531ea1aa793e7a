"""One module per command of ``neuralign``; each ``cmd_<name>(args, bars)`` returns the paths it wrote."""
