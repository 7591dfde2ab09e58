/*
 * pvio.ringbuf._ringfast: the ring's two hot calls (send, take) as CPython methods.
 *
 * Why this exists: a cffi call converts each argument through cffi's generic machinery
 * (a cdata check per pointer, an int conversion per count) and ring.py's wrapper adds a
 * Python frame, attribute loads and a tuple on top; at a batch of 64 entries that overhead
 * was three times the C ring's own work.  These two base types (FrontCore for FrontRing,
 * BackCore for BackRing) give ``send`` and ``take_responses`` / ``take_requests`` a
 * METH_FASTCALL entry that calls ring.c directly on the ring state cffi allocated: the same
 * C functions, the same struct, the same hostile-index checks (ring.c does them all).
 *
 * Only the common case is handled here: ``bytes`` (or another contiguous buffer, such as a
 * cffi buffer a C batch call filled) of whole entries to send, ``None`` or a non-negative int
 * for the take limit, a ring operation that succeeds.  Anything else -- an object that is not
 * a buffer, a length that is not whole entries, a negative result from ring.c
 * (overflow, released, misuse) -- goes to ring.py's Python implementation of the same call
 * (``_send_slow`` / ``_take_slow``), which raises the documented exception.  A failed ring
 * operation changes nothing, so repeating it there is safe.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "ring.h"

typedef struct {
    PyObject_HEAD
    void *ring;            /* struct pvio_front_ring * or struct pvio_back_ring * (cffi's memory) */
    char *out;             /* cffi's scratch for taken entries: cap * take_size bytes */
    Py_ssize_t send_size;  /* bytes per entry sent (front: req_size, back: rsp_size) */
    Py_ssize_t take_size;  /* bytes per entry taken */
    unsigned int cap;      /* the ring's slots: no take returns more */
    PyObject *keep;        /* the cdata objects owning `ring` and `out` */
} Core;

static PyObject *str_send_slow, *str_take_slow;

static int core_traverse(Core *self, visitproc visit, void *arg)
{
    Py_VISIT(self->keep);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int core_clear(Core *self)
{
    Py_CLEAR(self->keep);
    self->ring = NULL;
    self->out = NULL;
    return 0;
}

static void core_dealloc(Core *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    core_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* _bind(ring_address, out_address, send_size, take_size, cap, keep): called once by ring.py. */
static PyObject *core_bind(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "_bind takes 6 arguments");
        return NULL;
    }
    void *ring = PyLong_AsVoidPtr(args[0]);
    void *out = PyLong_AsVoidPtr(args[1]);
    Py_ssize_t send_size = PyLong_AsSsize_t(args[2]);
    Py_ssize_t take_size = PyLong_AsSsize_t(args[3]);
    unsigned long cap = PyLong_AsUnsignedLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (ring == NULL || out == NULL || send_size <= 0 || take_size <= 0 || cap == 0 || cap > 0x80000000ul) {
        PyErr_SetString(PyExc_ValueError, "_bind: bad ring state");
        return NULL;
    }
    Py_INCREF(args[5]);
    Py_XSETREF(self->keep, args[5]);
    self->ring = ring;
    self->out = out;
    self->send_size = send_size;
    self->take_size = take_size;
    self->cap = (unsigned int)cap;
    Py_RETURN_NONE;
}

typedef int (*send_fn)(void *r, const char *src, unsigned int n, int *notify);
typedef int (*take_fn)(void *r, char *dst, unsigned int max);

static PyObject *slow(Core *self, PyObject *name, PyObject *arg)
{
    return PyObject_CallMethodOneArg((PyObject *)self, name, arg);
}

static PyObject *do_send(Core *self, PyObject *const *args, Py_ssize_t nargs, send_fn fn)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "send() takes exactly one argument (the packed entries)");
        return NULL;
    }
    PyObject *data = args[0];
    if (self->ring == NULL)
        return slow(self, str_send_slow, data);
    /* bytes, or any C-contiguous buffer (a cffi buffer of entries a C batch call wrote) */
    Py_buffer view;
    int is_bytes = PyBytes_CheckExact(data);
    if (is_bytes) {
        view.buf = PyBytes_AS_STRING(data);
        view.len = PyBytes_GET_SIZE(data);
    } else if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return slow(self, str_send_slow, data);
    }
    Py_ssize_t len = view.len;
    Py_ssize_t n = len / self->send_size;
    int notify = 0;
    int sent = -1;
    if (n * self->send_size == len && n <= 0x7fffffff)
        sent = fn(self->ring, view.buf, (unsigned int)n, &notify);
    if (!is_bytes)
        PyBuffer_Release(&view);
    if (sent < 0)
        return slow(self, str_send_slow, data);
    PyObject *count = PyLong_FromLong(sent);
    if (count == NULL)
        return NULL;
    PyObject *result = PyTuple_Pack(2, count, notify ? Py_True : Py_False);
    Py_DECREF(count);
    return result;
}

static PyObject *do_take(Core *self, PyObject *const *args, Py_ssize_t nargs, take_fn fn)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "take takes at most one argument (max_n)");
        return NULL;
    }
    PyObject *arg = nargs ? args[0] : Py_None;
    unsigned int max = self->cap;
    if (self->ring == NULL)
        return slow(self, str_take_slow, arg);
    if (arg != Py_None) {
        if (!PyLong_CheckExact(arg))
            return slow(self, str_take_slow, arg);
        int overflow = 0;
        long m = PyLong_AsLongAndOverflow(arg, &overflow);
        if (overflow || m < 0)
            return slow(self, str_take_slow, arg);
        if ((unsigned long)m < max)
            max = (unsigned int)m;
    }
    int n = fn(self->ring, self->out, max);
    if (n < 0)
        return slow(self, str_take_slow, arg);
    return PyBytes_FromStringAndSize(self->out, (Py_ssize_t)n * self->take_size);
}

static PyObject *front_send(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    return do_send(self, args, nargs, (send_fn)pvio_front_send);
}

static PyObject *front_take(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    return do_take(self, args, nargs, (take_fn)pvio_front_take_responses);
}

static PyObject *back_send(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    return do_send(self, args, nargs, (send_fn)pvio_back_send);
}

static PyObject *back_take(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    return do_take(self, args, nargs, (take_fn)pvio_back_take_requests);
}

#define BIND_DOC "_bind(ring, out, send_size, take_size, cap, keep): attach the C state (ring.py only)."

static PyMethodDef front_methods[] = {
    {"_bind", (PyCFunction)(void (*)(void))core_bind, METH_FASTCALL, BIND_DOC},
    {"send", (PyCFunction)(void (*)(void))front_send, METH_FASTCALL,
     "send(data) -> (sent, notify): write as many packed requests as fit and publish them."},
    {"take_responses", (PyCFunction)(void (*)(void))front_take, METH_FASTCALL,
     "take_responses(max_n=None) -> bytes: copy up to max_n published responses out, once each."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef back_methods[] = {
    {"_bind", (PyCFunction)(void (*)(void))core_bind, METH_FASTCALL, BIND_DOC},
    {"send", (PyCFunction)(void (*)(void))back_send, METH_FASTCALL,
     "send(data) -> (sent, notify): write the packed responses and publish them."},
    {"take_requests", (PyCFunction)(void (*)(void))back_take, METH_FASTCALL,
     "take_requests(max_n=None) -> bytes: copy up to max_n published requests out, once each."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot front_slots[] = {
    {Py_tp_doc, "The fast send/take of FrontRing (its C base)."},
    {Py_tp_methods, front_methods},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Slot back_slots[] = {
    {Py_tp_doc, "The fast send/take of BackRing (its C base)."},
    {Py_tp_methods, back_methods},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

#define CORE_FLAGS (Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC)

static PyType_Spec front_spec = {"pvio.ringbuf._ringfast.FrontCore", sizeof(Core), 0, CORE_FLAGS, front_slots};
static PyType_Spec back_spec = {"pvio.ringbuf._ringfast.BackCore", sizeof(Core), 0, CORE_FLAGS, back_slots};

static int ringfast_exec(PyObject *module)
{
    str_send_slow = PyUnicode_InternFromString("_send_slow");
    str_take_slow = PyUnicode_InternFromString("_take_slow");
    if (str_send_slow == NULL || str_take_slow == NULL)
        return -1;
    PyObject *front = PyType_FromSpec(&front_spec);
    if (front == NULL || PyModule_AddObject(module, "FrontCore", front) < 0) {
        Py_XDECREF(front);
        return -1;
    }
    PyObject *back = PyType_FromSpec(&back_spec);
    if (back == NULL || PyModule_AddObject(module, "BackCore", back) < 0) {
        Py_XDECREF(back);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot ringfast_slots[] = {
    {Py_mod_exec, (void *)ringfast_exec},
    {0, NULL},
};

static struct PyModuleDef ringfast_module = {
    PyModuleDef_HEAD_INIT, "pvio.ringbuf._ringfast",
    "The ring's send and take as CPython methods (the hot path of ring.py's FrontRing/BackRing).",
    0, NULL, ringfast_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ringfast(void) { return PyModuleDef_Init(&ringfast_module); }
