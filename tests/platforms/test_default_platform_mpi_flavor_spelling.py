"""The default platform's ``mpi_flavor`` (launch param, constructor, ``BALSAM_MPI_FLAVOR``) as users
write it: any case, surrounding whitespace (a YAML block scalar's newline, a tab), and the common
names of each flavour's launcher; an unknown one is a one-line error naming the value as given and
the accepted ones.
"""

from __future__ import annotations

from typing import Any

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.platform import LaunchSpec


def _spec(**params: Any) -> LaunchSpec:
    return LaunchSpec(cmdline="app", hostnames=["h1"], ranks_per_node=2, launch_params=params)


@pytest.mark.parametrize("written", ["MPICH", "mpich ", " mpich\n", "\tMpich", "hydra", "Hydra\n", "mpich2",
                                     "Intel MPI", "impi", "MVAPICH2"])
def test_mpich_spellings(written: str) -> None:
    platform = DefaultPlatform(mpiexec="mpiexec")
    assert platform.mpi_flavor(_spec(mpi_flavor=written)) == "mpich"
    assert DefaultPlatform(mpi_flavor=written, mpiexec="mpiexec").mpi_flavor() == "mpich"
    assert "-ppn" in platform.mpi_launch_args(_spec(mpi_flavor=written))


@pytest.mark.parametrize("written", ["OpenMPI", "open-mpi", "Open MPI", "open_mpi", "ompi", " openmpi\n", "OpenRTE", "PRRTE"])
def test_openmpi_spellings(written: str, monkeypatch: pytest.MonkeyPatch) -> None:
    platform = DefaultPlatform(mpiexec="mpiexec")
    assert platform.mpi_flavor(_spec(mpi_flavor=written)) == "openmpi"
    assert "--npernode" in platform.mpi_launch_args(_spec(mpi_flavor=written))
    monkeypatch.setenv("BALSAM_MPI_FLAVOR", written)
    assert platform.mpi_flavor() == "openmpi"


def test_a_blank_launch_param_falls_back_to_the_platforms_flavour() -> None:
    assert DefaultPlatform(mpi_flavor="openmpi", mpiexec="mpiexec").mpi_flavor(_spec(mpi_flavor="  ")) == "openmpi"


@pytest.mark.parametrize("written", ["lam", " Lam\n", "mpich3x", 3])
def test_an_unknown_flavour_is_a_one_line_error_naming_it_and_the_accepted_ones(written: Any) -> None:
    with pytest.raises(ValueError) as caught:
        DefaultPlatform(mpiexec="mpiexec").mpi_flavor(_spec(mpi_flavor=written))
    message = str(caught.value)
    shown = written.strip() if isinstance(written, str) else written
    assert message.startswith(f"unknown MPI flavour {shown!r}") and "\n" not in message
    assert "accepted mpich" in message and "openmpi" in message


def test_pals_is_refused_with_where_to_go() -> None:
    with pytest.raises(ValueError, match="unknown MPI flavour 'cray-pals'.*a platform plugin whose MPI launcher is PALS: "
                                         "see `balsam plugins ls`") as refused:
        DefaultPlatform(mpiexec="mpiexec").mpi_flavor(_spec(mpi_flavor="cray-pals"))
    # a core module names no particular plugin
    assert "polaris" not in str(refused.value).lower() and "aurora" not in str(refused.value).lower()
