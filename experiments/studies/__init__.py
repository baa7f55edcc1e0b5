"""The paper's studies: one package per trained experiment, single modules for the rest.

    persona/, hamiltonian/, ultrafeedback/   data, runner, report (+ bundled/ data files where they have some)
    protocol.py      StudyRunner: what the `experiment` command needs of a study; where each study lives
    training.py      train_study: load the model → encode the study's data → train (every trained study)
    bundled.py       the bundled data files by name ("persona/agreeableness.jsonl", "preferences/...")
    one_step.py      reward models and encoded inputs of the one-step computations (commands, demo, benchmarks)
    demo.py          the one-step Persona demo; footnote3.py (Footnote 3); theorem2_model.py (Theorem 2 on a model)

Importing this package imports nothing (no numpy, no dynamics): the CLI's argument helpers read constants here.
"""

__all__: list[str] = []
