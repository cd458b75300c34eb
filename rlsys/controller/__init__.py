"""The controller: one process (the Ray driver, ``rlsys train``) that starts the actors and runs
the training loops. ``loop`` holds the ``Controller`` and its loops (read it first); the
mechanisms the loops call are components of their own:

* ``actors``   -- the Ray cluster, the resource check, ``Fleet`` (every actor by role, how each starts)
* ``weights``  -- ``WeightPublisher``: how a step's weights reach the rollout workers
* ``recovery`` -- ``Recovery``: deadlines, replacing dead or hung workers, learner restarts
* ``elastic``  -- the control plane (``rlsys scale / status / stop``) and ``ControlLoop``
* ``progress`` -- one record per step, the running totals, the progress line and the summary
"""
