"""Communication: the topology and its communicators, the peer exchange, traffic by link,
and the preemption agreement. Everything here that talks to MPI says which communicator."""
