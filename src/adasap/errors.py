"""The one exception type that reaches users as a clean, one-line message."""


class UserError(Exception):
    """A problem with the user's input: the CLI prints the message alone and exits with code 2.

    Messages name the problem and the fix in one line, e.g.
    ``unknown dataset 'fmnist': choose one of fashion-mnist, mnist, ...``.
    """
