"""Export as a planned job: `plan_export` checks every option and loads nothing; `run_export` runs the plan
(load, kernel choice, the variant's recipe, support files, validation against PyTorch, manifest) into an
atomic folder, reporting progress through a callback."""
