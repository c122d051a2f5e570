"""The one error type the model side raises for bad user input (configs, checkpoints, hub ids).

CLIs catch it and print its message without a traceback; everything else is a bug and should
propagate with one.
"""


class ModelError(ValueError):
    """A model config or checkpoint that cannot be used, with a message that says why and what to do."""
