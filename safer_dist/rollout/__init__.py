"""Code that runs inside rollout workers: the worker actor, candidate sampling, the decode loop.

``worker.py`` is the actor (:class:`~safer_dist.rollout.worker.RolloutWorker`): it loads a model
and serves ``generate``, ``sample``, ``logprobs`` and weight pushes; ``sampling.py``,
``decode.py``, ``draw.py`` and ``packed_linear.py`` are what ``sample`` and ``logprobs`` run;
``tensor_parallel.py`` is one rank of a worker spread over K devices. Nothing here places actors
or waits on Ray for other processes' answers.

The driver's side stays in :mod:`safer_dist.cluster`, beside the learners':
``cluster/rollout.py`` (``RolloutGroup``, ``TensorParallelWorkers``) places these workers, fans
calls out to them with deadlines and brings restarted ones back, as ``cluster/group.py``
(``LearnerGroup``) does for the learner ranks of ``train/learner.py``. So a package says where
its code runs: ``rollout/`` and ``train/`` inside the actors, ``cluster/`` in the driver, and
``weights/`` on both ends of the weight sync. Rollout workers import downwards only (``train/``
for models, tokenization and losses, ``erpo/pairs.py`` for the pair tokenization the learners
use too, ``weights/``); nothing here imports ``cluster/``.
"""
