"""The plain fit session (no Lightning): the momentum pass, the validation grid and its choice, the
learned-strength epochs and the verdicts, over a small collectives interface; and the typed settings
(:mod:`~austeer_pl.fit.config`) every command reads its defaults from.
"""
