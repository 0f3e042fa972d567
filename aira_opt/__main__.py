from aira_opt.cli import run

run()
