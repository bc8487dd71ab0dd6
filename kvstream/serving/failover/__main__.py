"""``python -m kvstream.serving.failover``: ``kvstream failover``; with ``--worker`` one worker process (what
:class:`~kvstream.serving.failover.cluster.Cluster` starts)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: every thread's stack, in its log
    from .config import FailoverConfig
    from .worker import worker_main

    inc, epoch, addr, cfg = sys.argv[2:6]
    host, port = addr.rsplit(":", 1)
    sys.exit(worker_main(FailoverConfig.from_json(cfg), int(inc), int(epoch), host, int(port)))

from .cli import main  # noqa: E402

sys.exit(main())
