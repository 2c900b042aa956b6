"""The stages, one module per notebook (lib/registry.py `Stage.module`: notebooks/NN_<name>.ipynb
calls lib/stages/<name>.py), and `context`, what every stage starts with: `begin`, the stage record,
inputs proven before use, previews. `parameters` holds the rules every stage parameter must pass."""
