/* Reading the fields of a torch c10d options object (AllreduceOptions) from its memory.
 *
 * dist.all_reduce hands the backend a fresh AllreduceOptions each call. Reading its reduceOp,
 * timeout and asyncOp through pybind costs three property calls (reduceOp also builds a ReduceOp
 * wrapper tied to its parent): about 0.8 us of the 1.2-1.3 us the torch backend's hot path spent
 * on top of comms' own call. cm_opts_peek reads the same three fields straight from the C++ object.
 *
 * Nothing here knows torch's layout. comms/torch_backend/peek.py finds it by probing: it fills
 * options objects with known values through pybind, looks for them in the objects' memory, checks
 * that every probe agrees, and only then hands the offsets to cm_opts_layout. Until that succeeds
 * (or after cm_opts_layout(0, ...)) cm_opts_peek answers -1 and Python reads the fields through
 * pybind as before.
 *
 * The object: `obj` is the Python object's address (its id()); the pointer to the C++ object
 * lies `value` bytes into it (pybind's instance: the object header, then the value pointer).
 */
#include <stdint.h>
#include <string.h>
#include "comms_native.h"

static struct { int on; uint32_t value, op, timeout_ms, async_op; } layout;

void cm_opts_layout(int on, uint32_t value, uint32_t op, uint32_t timeout_ms, uint32_t async_op) {
    layout.value = value;
    layout.op = op;
    layout.timeout_ms = timeout_ms;
    layout.async_op = async_op;
    layout.on = on;
}

int32_t cm_opts_peek(uintptr_t obj) {
    const unsigned char *v;
    int64_t ms;
    if (!layout.on) return -1;
    memcpy(&v, (const char *)obj + layout.value, sizeof v);
    if (!v) return -1;                          /* a wrapper with no C++ object (never initialised) */
    memcpy(&ms, v + layout.timeout_ms, sizeof ms);
    return (int32_t)v[layout.op] | (v[layout.async_op] != 0) << 8 | (ms < 0) << 9;
}

/* ---- numpy arrays ------------------------------------------------------------------------------
 * The fast path of comm.all_reduce(ndarray) needs the array's data pointer, and must see that the
 * array is C-contiguous and writable. ffi.from_buffer took 130-170 ns a call for that (a buffer
 * export and a cdata object, made and freed); these two fields of numpy's PyArrayObject take a
 * few. numpy's C ABI fixes where they lie, and every C extension reads them so (PyArray_DATA,
 * PyArray_FLAGS); comms/runtime/arrays.py still finds both offsets by probing and checks the
 * answers against numpy before it turns this on. Off, cm_array_data answers 0.
 *
 * `obj` is the array's address (id()), of an object whose type is exactly numpy.ndarray (the
 * caller checks), alive for the call (the caller holds it). */
static struct { int on; uint32_t data, flags, need; } array_layout;

void cm_array_layout(int on, uint32_t data, uint32_t flags, uint32_t need) {
    array_layout.data = data;
    array_layout.flags = flags;
    array_layout.need = need;
    array_layout.on = on;
}

uintptr_t cm_array_data(uintptr_t obj) {
    uintptr_t p;
    int32_t flags;
    if (!array_layout.on) return 0;
    memcpy(&flags, (const char *)obj + array_layout.flags, sizeof flags);
    if (((uint32_t)flags & array_layout.need) != array_layout.need) return 0;
    memcpy(&p, (const char *)obj + array_layout.data, sizeof p);
    return p;
}
