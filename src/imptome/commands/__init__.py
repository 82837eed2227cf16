"""The arguments of each `imptome` subcommand, one module per subcommand (see `imptome.cli`).

These modules import neither torch nor diffusers (nor numpy or matplotlib): `imptome <subcommand> --help`
and argument errors take a fraction of a second, where importing the job's own module takes seconds.
"""
