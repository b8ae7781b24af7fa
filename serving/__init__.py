"""The model server that runs inside each container or local process.

It imports nothing from Django or the control plane: `python -m serving --help`.
The traffic router that gives a deployment one stable address is `python -m serving.router`.
"""
