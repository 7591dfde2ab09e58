/*
 * pvio.frontends._snic_driver: the PyGuest smart NIC driver's per-frame work, one call per batch.
 *
 * frontends/smartnic_driver.py keeps the driver's state (free TX buffers, which buffers are
 * outstanding or posted) and orchestrates; these three loops do what it would otherwise do
 * frame by frame in Python, exactly as its Python reference functions (stage_tx_py,
 * reap_tx_py, reap_rx_py, held equal to these by tests/test_smartnic_driver_native.py):
 *
 *   check_frames  one pass over a batch: are they all bytes of a length the device takes;
 *   stage_tx  copy frames into free TX pool buffers and write their descriptors;
 *   reap_tx   take back the TX buffers that completions name (range- and state-checked);
 *   reap_rx   copy each received frame out of its pool buffer once and write the descriptor
 *             that re-posts the buffer.
 *
 * Completions come from the device and are never trusted: an id outside the ring's buffers
 * or not outstanding (posted) is refused and counted; an id repeated within one batch is
 * refused the second time (buffers are re-posted after the batch); a length beyond the
 * buffer is an error, never a read past it.  Every window is also checked against the
 * guest memory buffer itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define DESC_SIZE 16
#define CMPL_SIZE 8

static void put_desc(unsigned char *p, uint32_t buf, uint16_t len, uint16_t id)
{
    memset(p, 0, DESC_SIZE);
    p[0] = (unsigned char)buf, p[1] = (unsigned char)(buf >> 8);
    p[2] = (unsigned char)(buf >> 16), p[3] = (unsigned char)(buf >> 24);
    p[6] = (unsigned char)len, p[7] = (unsigned char)(len >> 8);
    p[8] = (unsigned char)id, p[9] = (unsigned char)(id >> 8);
}

static uint16_t u16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* A frame's bytes: bytes and bytearray directly, any other buffer through the buffer protocol
 * (released by release_frame).  0, or -1 with an exception set. */
static int get_frame(PyObject *obj, Py_buffer *view, const char **data, Py_ssize_t *len)
{
    view->obj = NULL;
    if (PyBytes_CheckExact(obj)) {
        *data = PyBytes_AS_STRING(obj), *len = PyBytes_GET_SIZE(obj);
        return 0;
    }
    if (PyByteArray_CheckExact(obj)) {
        *data = PyByteArray_AS_STRING(obj), *len = PyByteArray_GET_SIZE(obj);
        return 0;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    *data = view->buf, *len = view->len;
    return 0;
}

static void release_frame(Py_buffer *view)
{
    if (view->obj != NULL)
        PyBuffer_Release(view);
}

/* check_frames(frames, min_len, max_len) -> the index of the first frame that is not bytes or a
 * bytearray of min_len..max_len bytes, or -1: send_batch's one pass over a batch before it
 * stages any of it (the frames that fail are left to its Python, which converts or refuses). */
static PyObject *check_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "check_frames(frames: list, min_len, max_len)");
        return NULL;
    }
    Py_ssize_t lo = PyLong_AsSsize_t(args[1]), hi = PyLong_AsSsize_t(args[2]);
    if ((lo == -1 || hi == -1) && PyErr_Occurred())
        return NULL;
    PyObject *frames = args[0];
    Py_ssize_t n = PyList_GET_SIZE(frames);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyList_GET_ITEM(frames, i);
        Py_ssize_t len;
        if (PyBytes_CheckExact(f))
            len = PyBytes_GET_SIZE(f);
        else if (PyByteArray_CheckExact(f))
            len = PyByteArray_GET_SIZE(f);
        else
            return PyLong_FromSsize_t(i);
        if (len < lo || len > hi)
            return PyLong_FromSsize_t(i);
    }
    return PyLong_FromLong(-1);
}

/* stage_tx(frames, start, mem, pool_gpa, buf_size, free, outstanding) -> (descs, next, nbytes) */
static PyObject *stage_tx(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyList_Check(args[0]) || !PyList_Check(args[5]) || !PyByteArray_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "stage_tx(frames: list, start, mem, pool_gpa, buf_size, free: list, "
                                         "outstanding: bytearray)");
        return NULL;
    }
    PyObject *frames = args[0], *free = args[5], *outstanding = args[6];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    unsigned long long pool = PyLong_AsUnsignedLongLong(args[3]), size = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer mem;
    if (PyObject_GetBuffer(args[2], &mem, PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *descs = NULL, *result = NULL;
    Py_ssize_t nframes = PyList_GET_SIZE(frames), nfree = PyList_GET_SIZE(free);
    Py_ssize_t nout = PyByteArray_GET_SIZE(outstanding);
    if (start < 0 || start > nframes) {
        PyErr_SetString(PyExc_ValueError, "stage_tx: start outside the frames");
        goto out;
    }
    Py_ssize_t n = nframes - start < nfree ? nframes - start : nfree;
    descs = PyBytes_FromStringAndSize(NULL, n * DESC_SIZE);
    if (descs == NULL)
        goto out;
    unsigned char *dp = (unsigned char *)PyBytes_AS_STRING(descs);
    char *outs = PyByteArray_AS_STRING(outstanding);
    long long nbytes = 0;
    Py_ssize_t k = 0;
    for (; k < n; k++) {
        long idx = PyLong_AsLong(PyList_GET_ITEM(free, nfree - 1 - k));
        if (idx == -1 && PyErr_Occurred())
            goto undo;
        Py_buffer f;
        const char *data;
        Py_ssize_t len;
        if (get_frame(PyList_GET_ITEM(frames, start + k), &f, &data, &len) < 0)
            goto undo;
        unsigned long long at = pool + (unsigned long long)idx * size;
        if (idx < 0 || idx >= nout || (unsigned long long)len > size || len > 0xFFFF ||
            at + size > (unsigned long long)mem.len || at + size < at) {
            release_frame(&f);
            PyErr_Format(PyExc_ValueError, "stage_tx: frame %zd (%zd bytes) does not fit TX buffer %ld",
                         start + k, len, idx);
            goto undo;
        }
        memcpy((char *)mem.buf + at, data, (size_t)len); /* the driver's copy into its buffer */
        put_desc(dp + k * DESC_SIZE, (uint32_t)idx, (uint16_t)len, (uint16_t)idx);
        release_frame(&f);
        outs[idx] = 1;
        nbytes += len;
    }
    if (PyList_SetSlice(free, nfree - n, nfree, NULL) < 0)
        goto out;
    result = Py_BuildValue("OnL", descs, start + n, nbytes);
    goto out;
undo: /* leave the driver's state as it was: nothing staged is published */
    for (Py_ssize_t j = 0; j < k; j++) {
        long idx = PyLong_AsLong(PyList_GET_ITEM(free, nfree - 1 - j));
        if (idx >= 0 && idx < nout)
            outs[idx] = 0;
    }
out:
    Py_XDECREF(descs);
    PyBuffer_Release(&mem);
    return result;
}

/* reap_tx(cmpls, outstanding, free) -> (reaped, bad_completions, error_statuses) */
static PyObject *reap_tx(PyObject *self, PyObject *args)
{
    Py_buffer cm;
    PyObject *outstanding, *free;
    if (!PyArg_ParseTuple(args, "y*O!O!", &cm, &PyByteArray_Type, &outstanding, &PyList_Type, &free))
        return NULL;
    PyObject *errors = PyList_New(0), *result = NULL;
    if (errors == NULL)
        goto out;
    Py_ssize_t n = cm.len / CMPL_SIZE, nout = PyByteArray_GET_SIZE(outstanding);
    char *outs = PyByteArray_AS_STRING(outstanding);
    const unsigned char *cp = cm.buf;
    long reaped = 0, bad = 0;
    for (Py_ssize_t i = 0; i < n; i++, cp += CMPL_SIZE) {
        uint16_t id = u16(cp);
        int16_t status = (int16_t)u16(cp + 4);
        if (id >= nout || !outs[id]) {
            bad++;
            continue;
        }
        outs[id] = 0;
        PyObject *v = PyLong_FromLong(id);
        if (v == NULL || PyList_Append(free, v) < 0) {
            Py_XDECREF(v);
            goto out;
        }
        Py_DECREF(v);
        reaped++;
        if (status != 0) {
            PyObject *s = PyLong_FromLong(status);
            if (s == NULL || PyList_Append(errors, s) < 0) {
                Py_XDECREF(s);
                goto out;
            }
            Py_DECREF(s);
        }
    }
    result = Py_BuildValue("llO", reaped, bad, errors);
out:
    Py_XDECREF(errors);
    PyBuffer_Release(&cm);
    return result;
}

/* reap_rx(cmpls, mem, pool_gpa, buf_size, nr_tx, posted, room)
 *   -> (frames, repost_descs, bad_completions, error_statuses, drops_full, frame_bytes) */
static PyObject *reap_rx(PyObject *self, PyObject *args)
{
    Py_buffer cm, mem;
    unsigned long long pool, size;
    Py_ssize_t nr_tx, room;
    PyObject *posted;
    if (!PyArg_ParseTuple(args, "y*y*KKnO!n", &cm, &mem, &pool, &size, &nr_tx, &PyByteArray_Type, &posted,
                          &room))
        return NULL;
    PyObject *frames = PyList_New(0), *errors = PyList_New(0), *repost = NULL, *result = NULL;
    Py_ssize_t n = cm.len / CMPL_SIZE, nbufs = PyByteArray_GET_SIZE(posted);
    if (frames == NULL || errors == NULL)
        goto out;
    repost = PyBytes_FromStringAndSize(NULL, n * DESC_SIZE);
    if (repost == NULL)
        goto out;
    char *post = PyByteArray_AS_STRING(posted);
    unsigned char *rp = (unsigned char *)PyBytes_AS_STRING(repost);
    const unsigned char *cp = cm.buf;
    long bad = 0, full = 0;
    long long nbytes = 0;
    Py_ssize_t nrepost = 0;
    for (Py_ssize_t i = 0; i < n; i++, cp += CMPL_SIZE) {
        uint16_t id = u16(cp), len = u16(cp + 2);
        int16_t status = (int16_t)u16(cp + 4);
        if (id < nr_tx || id >= nbufs || !post[id]) {
            bad++;
            continue;
        }
        post[id] = 0;
        put_desc(rp + nrepost++ * DESC_SIZE, id, (uint16_t)(size > 0xFFFF ? 0xFFFF : size), id);
        unsigned long long at = pool + (unsigned long long)id * size;
        if (status != 0 || len > size || at + len > (unsigned long long)mem.len) {
            PyObject *s = PyLong_FromLong(status);
            if (s == NULL || PyList_Append(errors, s) < 0) {
                Py_XDECREF(s);
                goto out;
            }
            Py_DECREF(s);
            continue;
        }
        if (room <= 0) {
            full++;
            continue;
        }
        PyObject *f = PyBytes_FromStringAndSize((const char *)mem.buf + at, len); /* out once */
        if (f == NULL || PyList_Append(frames, f) < 0) {
            Py_XDECREF(f);
            goto out;
        }
        Py_DECREF(f);
        nbytes += len;
        room--;
    }
    for (Py_ssize_t i = 0; i < nrepost; i++) /* after the batch: a repeated id stays refused */
        post[u16(rp + i * DESC_SIZE)] = 1;
    if (_PyBytes_Resize(&repost, nrepost * DESC_SIZE) < 0)
        goto out;
    result = Py_BuildValue("OOlOlL", frames, repost, bad, errors, full, nbytes);
out:
    Py_XDECREF(frames);
    Py_XDECREF(errors);
    Py_XDECREF(repost);
    PyBuffer_Release(&cm);
    PyBuffer_Release(&mem);
    return result;
}

static PyMethodDef methods[] = {
    {"check_frames", (PyCFunction)(void (*)(void))check_frames, METH_FASTCALL,
     "check_frames(frames, min_len, max_len) -> index of the first frame not bytes/bytearray of "
     "min_len..max_len bytes, or -1"},
    {"stage_tx", (PyCFunction)(void (*)(void))stage_tx, METH_FASTCALL,
     "stage_tx(frames, start, mem, pool_gpa, buf_size, free, outstanding) -> (descs, next, nbytes)"},
    {"reap_tx", reap_tx, METH_VARARGS, "reap_tx(cmpls, outstanding, free) -> (reaped, bad, error_statuses)"},
    {"reap_rx", reap_rx, METH_VARARGS,
     "reap_rx(cmpls, mem, pool_gpa, buf_size, nr_tx, posted, room) -> (frames, repost, bad, error_statuses, "
     "drops_full, frame_bytes)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pvio.frontends._snic_driver",
    "The smart NIC driver's per-frame loops in C (frontends/smartnic_driver.py holds the reference).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__snic_driver(void) { return PyModule_Create(&module); }
