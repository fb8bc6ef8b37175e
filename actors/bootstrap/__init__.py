"""The composition root: which actors exist, what bus and storage a process gets, running them until SIGTERM."""
