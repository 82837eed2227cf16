"""The arguments and input checks of each `imptome` subcommand, one module per subcommand (see `imptome.cli`).

These modules import neither torch nor diffusers, nor numpy or matplotlib at their top level (`bench quality`
reads its built-in prompts with numpy when no --prompts is given): `imptome <subcommand> --help`, argument
errors and bad input such as a missing prompt file are answered in a fraction of a second, where importing
the job's own module takes seconds.
"""
