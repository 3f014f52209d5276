"""The one exception type that reaches the user as a paragraph instead of a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data, checkpoint, prompt).

    The message is a complete paragraph that says what is wrong and names the
    fix (the flag or the command). `launch.py` prints it without a traceback
    and exits non-zero.
    """
