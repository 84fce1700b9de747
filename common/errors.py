"""The one exception type for bad user input.

Raise `InputError` for anything the user can fix (a recipe key, a data row, a file, a model name).
The CLI prints its message as one line and exits with code 2 before any training starts.
"""


class InputError(Exception):
    """A problem with the user's input: the message names the file / row / key, what was expected and
    what to do."""

    exit_code = 2
