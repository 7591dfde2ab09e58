/*
 * pvio.core._frames: move a batch of frames between Python objects and guest memory in one call.
 *
 * Why this exists: the data path's per-frame work is in C (netpath.c), but cffi can neither
 * take a list of `bytes` nor make one.  Before this module a driver copied each frame with a
 * Python-level slice assignment (or made each received frame with a slice), which cost more
 * than everything netpath.c does for the frame.  These three functions take the whole batch:
 *
 *   lengths(frames, start, count, out_lens, max_len) -> (k, total)
 *       the lengths of frames[start:start+count] into a uint32 buffer, stopping at the first
 *       frame that is not bytes/bytearray or whose length is 0 or above max_len.
 *   scatter(mem, frames, start, count, starts, ends) -> total
 *       copy frames[start+j] to mem[starts[j]:ends[j]] (uint64 buffers): each frame's length
 *       must equal its span, and each span must lie inside mem.
 *   gather(mem, starts, ends, count) -> (frames, total)
 *       the list of bytes(mem[starts[j]:ends[j]]) for each j (one copy each).
 *   pop_ids(stack, count, out)
 *       pop `count` ints (each 0..65535) off the end of the list `stack` into a uint16 buffer,
 *       in the order list.pop() would give them: a driver's free slot ids for one batch,
 *       without a Python int conversion per id on the way into C.
 *
 * Everything is checked before memory is touched (a span outside `mem`, a length that does not
 * match, a count beyond a buffer): a bad call raises ValueError/TypeError and copies nothing.
 * The spans come from netpath.c, which computed them from the driver's own page table; the
 * checks here are a second fence, so a bug can never write outside guest memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* A contiguous buffer of at least `need` items of `item` bytes (format-agnostic). */
static int get_array(PyObject *obj, Py_buffer *view, Py_ssize_t count, Py_ssize_t item, int writable,
                     const char *what)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len < count * item) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, not the %zd that %zd entries need", what,
                     view->len, count * item, count);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int frame_data(PyObject *f, const char **data, Py_ssize_t *len)
{
    if (PyBytes_CheckExact(f)) {
        *data = PyBytes_AS_STRING(f);
        *len = PyBytes_GET_SIZE(f);
        return 1;
    }
    if (PyByteArray_CheckExact(f)) {
        *data = PyByteArray_AS_STRING(f);
        *len = PyByteArray_GET_SIZE(f);
        return 1;
    }
    return 0;
}

/* The frames list, start and count as a checked range of the list. */
static int frame_range(PyObject *const *args, PyObject **frames, Py_ssize_t *start, Py_ssize_t *count)
{
    *frames = args[0];
    if (!PyList_Check(*frames)) {
        PyErr_SetString(PyExc_TypeError, "frames must be a list");
        return -1;
    }
    *start = PyLong_AsSsize_t(args[1]);
    *count = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return -1;
    if (*start < 0 || *count < 0 || *start > PyList_GET_SIZE(*frames) ||
        *count > PyList_GET_SIZE(*frames) - *start) {
        PyErr_Format(PyExc_ValueError, "frames[%zd:%zd+%zd] is outside a list of %zd", *start, *start, *count,
                     PyList_GET_SIZE(*frames));
        return -1;
    }
    return 0;
}

static PyObject *lengths(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "lengths(frames, start, count, out_lens, max_len)");
        return NULL;
    }
    PyObject *frames;
    Py_ssize_t start, count;
    if (frame_range(args, &frames, &start, &count) < 0)
        return NULL;
    Py_ssize_t max_len = PyLong_AsSsize_t(args[4]);
    if (max_len == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer out;
    if (get_array(args[3], &out, count, sizeof(uint32_t), 1, "out_lens") < 0)
        return NULL;
    uint32_t *lens = out.buf;
    Py_ssize_t k = 0, total = 0;
    for (; k < count; k++) {
        const char *data;
        Py_ssize_t len;
        if (!frame_data(PyList_GET_ITEM(frames, start + k), &data, &len) || len == 0 || len > max_len)
            break;
        lens[k] = (uint32_t)len;
        total += len;
    }
    PyBuffer_Release(&out);
    return Py_BuildValue("(nn)", k, total);
}

/* The (starts, ends) span buffers, checked against each other and against mem. */
static int spans(PyObject *s_obj, PyObject *e_obj, Py_buffer *s, Py_buffer *e, Py_ssize_t count,
                 Py_ssize_t mem_len)
{
    if (get_array(s_obj, s, count, sizeof(uint64_t), 0, "starts") < 0)
        return -1;
    if (get_array(e_obj, e, count, sizeof(uint64_t), 0, "ends") < 0) {
        PyBuffer_Release(s);
        return -1;
    }
    const uint64_t *st = s->buf, *en = e->buf;
    for (Py_ssize_t j = 0; j < count; j++) {
        if (st[j] > en[j] || en[j] > (uint64_t)mem_len) {
            PyErr_Format(PyExc_ValueError, "span %zd [%llu, %llu) is outside memory of %zd bytes", j,
                         (unsigned long long)st[j], (unsigned long long)en[j], mem_len);
            PyBuffer_Release(s);
            PyBuffer_Release(e);
            return -1;
        }
    }
    return 0;
}

static PyObject *scatter(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "scatter(mem, frames, start, count, starts, ends)");
        return NULL;
    }
    PyObject *frames;
    Py_ssize_t start, count;
    if (frame_range(args + 1, &frames, &start, &count) < 0)
        return NULL;
    Py_buffer mem, s, e;
    if (PyObject_GetBuffer(args[0], &mem, PyBUF_WRITABLE) < 0)
        return NULL;
    if (spans(args[4], args[5], &s, &e, count, mem.len) < 0) {
        PyBuffer_Release(&mem);
        return NULL;
    }
    const uint64_t *st = s.buf, *en = e.buf;
    Py_ssize_t total = 0, j;
    for (j = 0; j < count; j++) {  /* every frame checked before the first byte moves */
        const char *data;
        Py_ssize_t len;
        if (!frame_data(PyList_GET_ITEM(frames, start + j), &data, &len) || (uint64_t)len != en[j] - st[j])
            break;
        total += len;
    }
    if (j == count) {
        for (j = 0; j < count; j++) {
            const char *data = NULL;
            Py_ssize_t len = 0;
            frame_data(PyList_GET_ITEM(frames, start + j), &data, &len);
            memcpy((char *)mem.buf + st[j], data, (size_t)len);
        }
    } else {
        PyErr_Format(PyExc_ValueError, "frame %zd is not bytes of its span's %llu bytes", start + j,
                     (unsigned long long)(en[j] - st[j]));
    }
    PyBuffer_Release(&s);
    PyBuffer_Release(&e);
    PyBuffer_Release(&mem);
    if (j != count)
        return NULL;
    return PyLong_FromSsize_t(total);
}

static PyObject *gather(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "gather(mem, starts, ends, count)");
        return NULL;
    }
    Py_ssize_t count = PyLong_AsSsize_t(args[3]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    if (count < 0) {
        PyErr_SetString(PyExc_ValueError, "gather: count must be >= 0");
        return NULL;
    }
    Py_buffer mem, s, e;
    if (PyObject_GetBuffer(args[0], &mem, PyBUF_SIMPLE) < 0)
        return NULL;
    if (spans(args[1], args[2], &s, &e, count, mem.len) < 0) {
        PyBuffer_Release(&mem);
        return NULL;
    }
    const uint64_t *st = s.buf, *en = e.buf;
    Py_ssize_t total = 0;
    PyObject *result = NULL;
    PyObject *out = PyList_New(count);
    if (out == NULL)
        goto done;
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)mem.buf + st[j], (Py_ssize_t)(en[j] - st[j]));
        if (b == NULL) {
            Py_DECREF(out);
            goto done;
        }
        PyList_SET_ITEM(out, j, b);
        total += (Py_ssize_t)(en[j] - st[j]);
    }
    result = Py_BuildValue("(Nn)", out, total);
done:
    PyBuffer_Release(&s);
    PyBuffer_Release(&e);
    PyBuffer_Release(&mem);
    return result;
}

static PyObject *pop_ids(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "pop_ids(stack: list, count, out)");
        return NULL;
    }
    PyObject *stack = args[0];
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t len = PyList_GET_SIZE(stack);
    if (count < 0 || count > len) {
        PyErr_Format(PyExc_ValueError, "cannot pop %zd ids off a stack of %zd", count, len);
        return NULL;
    }
    Py_buffer out;
    if (get_array(args[2], &out, count, sizeof(uint16_t), 1, "out") < 0)
        return NULL;
    uint16_t *ids = out.buf;
    for (Py_ssize_t j = 0; j < count; j++) {  /* every id checked before the stack changes */
        long v = PyLong_AsLong(PyList_GET_ITEM(stack, len - 1 - j));
        if ((v == -1 && PyErr_Occurred()) || v < 0 || v > 0xFFFF) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "id %ld is not a 16-bit slot id", v);
            PyBuffer_Release(&out);
            return NULL;
        }
        ids[j] = (uint16_t)v;
    }
    PyBuffer_Release(&out);
    if (PyList_SetSlice(stack, len - count, len, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lengths", (PyCFunction)(void (*)(void))lengths, METH_FASTCALL,
     "lengths(frames, start, count, out_lens, max_len) -> (k, total): the leading k frames' lengths."},
    {"scatter", (PyCFunction)(void (*)(void))scatter, METH_FASTCALL,
     "scatter(mem, frames, start, count, starts, ends) -> total: copy each frame to its span."},
    {"gather", (PyCFunction)(void (*)(void))gather, METH_FASTCALL,
     "gather(mem, starts, ends, count) -> (frames, total): each span of mem as bytes."},
    {"pop_ids", (PyCFunction)(void (*)(void))pop_ids, METH_FASTCALL,
     "pop_ids(stack, count, out): pop count 16-bit ids off a list's end into a uint16 buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "pvio.core._frames",
    .m_doc = "A batch of frames between Python objects and guest memory in one call (see frames.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__frames(void)
{
    return PyModule_Create(&module);
}
