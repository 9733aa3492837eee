"""Weight sync from the learners to the rollout workers, in one place.

``driver.py`` (``WeightSync``: set-up, pushes, a restarted worker's rejoin; the learner group and
the rollout group both call it), ``ends.py`` (a learner rank's and a rollout worker's end: full
weights or adapters only), ``layout.py`` (broadcast or CUDA-IPC hand-over, per member),
``channel.py`` (the transfer, with its version and dtype checks), ``adapters.py`` (LoRA).
"""
