"""The exceptions the command-line tools turn into a one-line message and an exit code."""


class UserError(ValueError):
    """A mistake the user can fix (bad config, missing data, wrong shapes).

    The message is one sentence naming the cause and the fix. CLIs print it
    without a traceback (set LVM_DEBUG=1 to see the trace).
    """


# The exit status of a process ended by SIGTERM (128 + 15), as a shell reports it: a scheduler that
# retries failed jobs (a Kubernetes Job, a SLURM requeue script) sees an unfinished run, not success.
PREEMPTED_EXIT_CODE = 143


class Preempted(Exception):
    """Training stopped early at a preemption notice (SIGTERM) after saving a checkpoint.

    Not an error in the run: rerunning the same command resumes from `step`. lvm-train
    prints the message and exits with PREEMPTED_EXIT_CODE. An eval due at `step` is skipped
    (the grace period goes to the save); the resumed run runs it first.
    """

    def __init__(self, step: int, total_steps: int, checkpoint_dir: str):
        self.step = step
        super().__init__(f"preempted (SIGTERM): saved the checkpoint of step {step}/{total_steps} in "
                         f"{checkpoint_dir}; rerun the same command to resume.")
