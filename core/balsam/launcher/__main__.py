"""``python -m balsam.launcher ...`` (the job template's launcher command)."""

from balsam.cli.launcher import launcher_command

if __name__ == "__main__":
    launcher_command(prog_name="python -m balsam.launcher")
