"""The one exception type the command-line tools turn into a one-line message."""


class UserError(ValueError):
    """A mistake the user can fix (bad config, missing data, wrong shapes).

    The message is one sentence naming the cause and the fix. CLIs print it
    without a traceback (set LVM_DEBUG=1 to see the trace).
    """
