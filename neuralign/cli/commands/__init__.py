"""One module per command (or pair of commands) of ``neuralign``.

Each module defines its commands' sub-parsers and bodies and registers them in its ``COMMANDS``
(``{name: (add_parser, run)}``, ``run(args, bars)`` returning the paths it wrote); :data:`COMMAND_MODULES` lists the
modules in the order of ``neuralign --help``. A new command is a new module here and its name in that list.
"""

#: The command modules, in the order their commands are listed by ``neuralign --help``.
COMMAND_MODULES = ("study", "compare", "train", "align", "curve", "pam", "evaluate", "verify")
