"""The shared-memory segment functions of the C core (cm_shm_*, cm_window_map) return CM_* codes
only, with the errno behind a failure in their out-parameter: a -errno in the return code would read
as some CM_E_* code in comms.errors (-ENOENT as E_PEER_CLOSED, -EPERM as E_TIMEOUT) and be mapped
to the wrong exception by error_class."""
from __future__ import annotations

import errno
import os
import secrets

import pytest

from comms import errors
from comms._native import ffi, lib
from comms.moe import windows
from comms.runtime.cleanup import SHM_DIR

CM_CODES = {errors.OK, errors.E_TIMEOUT, errors.E_PEER_CLOSED, errors.E_PEER_DEAD, errors.E_PEER_ABORTED,
            errors.E_MISMATCH, errors.E_TRUNCATE, errors.E_SYS, errors.E_INVALID, errors.E_NOMEM,
            errors.E_ABORTED, errors.E_REVOKED, errors.E_LIMIT}


def fresh_name() -> str:
    return f"comms-test-codes.{os.getpid()}.{secrets.token_hex(4)}"


@pytest.fixture
def segment():
    """A segment of 4 KiB created through the C core, its name and address; removed after."""
    name = fresh_name()
    out, err = ffi.new("void **"), ffi.new("int *", -1)
    nbytes = lib.cm_shm_segment_bytes(2, 2, 64, 0)
    assert lib.cm_shm_create(name.encode(), nbytes, out, err) == errors.OK and err[0] == 0
    lib.cm_shm_init_segment(out[0], 2, 2, 64, 0)
    yield name, out[0], nbytes
    lib.cm_shm_unmap(out[0], nbytes, ffi.NULL)
    lib.cm_shm_unlink(name.encode(), ffi.NULL)


def call(fn, *args):
    """fn(*args, &errno): (return code, errno); the code must be a CM_* code."""
    err = ffi.new("int *", -1)
    rc = fn(*args, err)
    assert rc in CM_CODES, f"{fn.__name__} returned {rc}, which is no CM_* code"
    return rc, err[0]


def test_a_missing_segment_is_a_system_error_with_its_errno():
    out = ffi.new("void **")
    rc, err = call(lib.cm_shm_attach, fresh_name().encode(), 4096, out)
    # before: -ENOENT, that is E_PEER_CLOSED, which error_class turns into a PeerError
    assert (rc, err) == (errors.E_SYS, errno.ENOENT)
    assert errors.error_class(rc) is errors.TransportError


def test_a_bad_name_is_invalid_and_says_so_in_errno():
    out = ffi.new("void **")
    assert call(lib.cm_shm_attach, b"a/b", 4096, out) == (errors.E_INVALID, errno.EINVAL)
    assert call(lib.cm_shm_create, b"", 4096, out) == (errors.E_INVALID, errno.EINVAL)
    assert call(lib.cm_shm_unlink, b"x/y") == (errors.E_INVALID, errno.EINVAL)


def test_creating_an_existing_segment_keeps_eexist_out_of_the_code(segment):
    name, _, nbytes = segment
    out = ffi.new("void **")
    assert call(lib.cm_shm_create, name.encode(), nbytes, out) == (errors.E_SYS, errno.EEXIST)


def test_a_segment_too_small_or_not_comms_is_invalid(segment):
    name, addr, nbytes = segment
    out = ffi.new("void **")
    assert call(lib.cm_shm_attach, name.encode(), nbytes * 2, out) == (errors.E_INVALID, errno.EBADMSG)
    # a segment whose magic is not comms'
    other = fresh_name()
    with open(os.path.join(SHM_DIR, other), "wb") as f:
        f.write(b"\0" * 4096)
    try:
        assert call(lib.cm_shm_attach, other.encode(), 4096, out) == (errors.E_INVALID, errno.EBADMSG)
    finally:
        os.unlink(os.path.join(SHM_DIR, other))
    rc, err = call(lib.cm_shm_attach, name.encode(), nbytes, out)
    assert (rc, err) == (errors.OK, 0)
    assert lib.cm_shm_unmap(out[0], nbytes, ffi.NULL) == errors.OK


def test_no_room_is_out_of_memory_with_the_errno():
    out = ffi.new("void **")
    name = fresh_name()
    rc, err = call(lib.cm_shm_create, name.encode(), 1 << 62, out)
    assert rc == errors.E_NOMEM and err in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM)
    assert not os.path.exists(os.path.join(SHM_DIR, name))          # nothing left behind


def test_unlink_and_unmap_failures(segment):
    name, addr, nbytes = segment
    assert call(lib.cm_shm_unlink, fresh_name().encode()) == (errors.E_SYS, errno.ENOENT)
    assert call(lib.cm_shm_unmap, ffi.cast("void *", 1), 4096) == (errors.E_SYS, errno.EINVAL)


def test_window_map_codes():
    size, out = ffi.new("uint64_t *", 4096), ffi.new("void **")
    assert call(lib.cm_window_map, b"a/b", size, 0, out) == (errors.E_INVALID, errno.EINVAL)
    assert call(lib.cm_window_map, fresh_name().encode(), size, 0, out) == (errors.E_SYS, errno.ENOENT)
    size[0] = 1 << 62
    assert call(lib.cm_window_map, fresh_name().encode(), size, 1, out)[0] == errors.E_NOMEM


def test_python_names_the_errno_not_a_code():
    with pytest.raises(errors.TransportError, match="No such file or directory"):
        windows.map_window(fresh_name(), 4096, create=False)
