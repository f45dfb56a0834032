"""Built-in launcher job modes: ``mpi`` (one MPI launch per job) and ``serial`` (packed tasks per node)."""
