/*
 * pvio.backends._snic_dma: the smart NIC's DMA loops, one call per batch of descriptors.
 *
 * backends/smartnic.py takes a batch of descriptors from a ring (ring.c copies each out of
 * the shared page once) and hands the copy here: for each descriptor this checks it exactly
 * as the Python reference does (``tx_batch_py`` / ``rx_batch_py`` in smartnic.py, held equal
 * to this by tests/test_smartnic_dma.py), moves the frame between guest memory and Python
 * ``bytes`` and writes the completion.  A descriptor naming a granted page (SNIC_F_GREF, well
 * formed) needs the grant table, which is Python's: the loop stops before it and returns its
 * index, and smartnic.py serves that one descriptor and calls again for the rest.
 *
 * Every descriptor is hostile: pool indices, offsets and lengths are range-checked against
 * the pool geometry the device validated at ENABLE *and* against the guest memory buffer
 * itself, so no descriptor reads or writes outside the domain's RAM whatever the registers
 * said.  A refused descriptor is completed with its status and counted, never raised.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define DESC_SIZE 16
#define CMPL_SIZE 8
#define F_GREF 0x1u
#define E_BAD_BUF (-1)
#define E_BAD_LEN (-3)
#define E_BAD_FLAGS (-4)
#define ETH_HEADER_LEN 14

struct desc {
    uint32_t buf;
    uint16_t offset, len, id, flags;
};

static struct desc get_desc(const unsigned char *p)
{
    struct desc d;
    d.buf = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    d.offset = (uint16_t)(p[4] | p[5] << 8);
    d.len = (uint16_t)(p[6] | p[7] << 8);
    d.id = (uint16_t)(p[8] | p[9] << 8);
    d.flags = (uint16_t)(p[10] | p[11] << 8);
    return d; /* bytes 12..15 (reserved) are ignored, as the Python reference ignores them */
}

static void put_cmpl(unsigned char *p, uint16_t id, uint16_t len, int16_t status)
{
    uint16_t st = (uint16_t)status;
    p[0] = (unsigned char)id, p[1] = (unsigned char)(id >> 8);
    p[2] = (unsigned char)len, p[3] = (unsigned char)(len >> 8);
    p[4] = (unsigned char)st, p[5] = (unsigned char)(st >> 8);
    p[6] = 0, p[7] = 0;
}

struct pool {
    unsigned long long base, size, count;
};

/* Where descriptor d's pool buffer window lies in guest memory (0), or why it does not (a
 * negative status), or 1 if it names a granted page (Python's to serve).  The order of the
 * checks is the Python reference's (SmartNic._buffer). */
static int window(const struct desc *d, const struct pool *pl, Py_ssize_t mem_len, unsigned long long *gpa)
{
    if (d->flags & ~F_GREF)
        return E_BAD_FLAGS;
    if (d->len == 0)
        return E_BAD_LEN;
    if (d->flags & F_GREF)
        return 1;
    if (d->buf >= pl->count)
        return E_BAD_BUF;
    if ((unsigned long long)d->offset + d->len > pl->size)
        return E_BAD_LEN;
    unsigned long long at = pl->base + d->buf * pl->size + d->offset;
    if (at + d->len > (unsigned long long)mem_len || at + d->len < at)
        return E_BAD_BUF; /* unreachable after ENABLE's checks; never trusted */
    *gpa = at;
    return 0;
}

static void count_refusal(int status, long *bad_len, long *bad_buf, long *bad_flags)
{
    if (status == E_BAD_LEN)
        (*bad_len)++;
    else if (status == E_BAD_BUF)
        (*bad_buf)++;
    else
        (*bad_flags)++;
}

/* tx_batch(descs, mem, pool_base, pool_size, pool_count, start)
 *   -> (frames, cmpls, end, nbytes, bad_len, bad_buf, bad_flags) */
static PyObject *tx_batch(PyObject *self, PyObject *args)
{
    Py_buffer descs, mem;
    struct pool pl;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "y*y*KKKn", &descs, &mem, &pl.base, &pl.size, &pl.count, &start))
        return NULL;
    PyObject *frames = NULL, *cmpls = NULL, *result = NULL;
    Py_ssize_t n = descs.len / DESC_SIZE;
    if (descs.len % DESC_SIZE || start < 0 || start > n) {
        PyErr_SetString(PyExc_ValueError, "tx_batch: descriptors are not whole 16-byte entries");
        goto out;
    }
    frames = PyList_New(0);
    cmpls = PyBytes_FromStringAndSize(NULL, (n - start) * CMPL_SIZE);
    if (frames == NULL || cmpls == NULL)
        goto out;
    unsigned char *cp = (unsigned char *)PyBytes_AS_STRING(cmpls);
    const unsigned char *dp = (const unsigned char *)descs.buf;
    long long nbytes = 0;
    long bad_len = 0, bad_buf = 0, bad_flags = 0;
    Py_ssize_t i = start, k = 0;
    for (; i < n; i++) {
        struct desc d = get_desc(dp + i * DESC_SIZE);
        unsigned long long gpa = 0;
        int status = d.len < ETH_HEADER_LEN ? E_BAD_LEN : window(&d, &pl, mem.len, &gpa);
        if (status == 1)
            break; /* a granted page: Python's */
        if (status < 0) {
            count_refusal(status, &bad_len, &bad_buf, &bad_flags);
            put_cmpl(cp + k++ * CMPL_SIZE, d.id, 0, (int16_t)status);
            continue;
        }
        PyObject *frame = PyBytes_FromStringAndSize((const char *)mem.buf + gpa, d.len); /* the DMA read */
        if (frame == NULL || PyList_Append(frames, frame) < 0) {
            Py_XDECREF(frame);
            goto out;
        }
        Py_DECREF(frame);
        nbytes += d.len;
        put_cmpl(cp + k++ * CMPL_SIZE, d.id, d.len, 0);
    }
    if (_PyBytes_Resize(&cmpls, k * CMPL_SIZE) < 0)
        goto out;
    result = Py_BuildValue("OOnLlll", frames, cmpls, i, nbytes, bad_len, bad_buf, bad_flags);
out:
    Py_XDECREF(frames);
    Py_XDECREF(cmpls);
    PyBuffer_Release(&descs);
    PyBuffer_Release(&mem);
    return result;
}

/* rx_batch(descs, frames, mem, pool_base, pool_size, pool_count)
 *   -> (cmpls, descs_used, frames_used, delivered, nbytes, too_big, bad_len, bad_buf, bad_flags) */
static PyObject *rx_batch(PyObject *self, PyObject *args)
{
    Py_buffer descs, mem;
    PyObject *frames;
    struct pool pl;
    if (!PyArg_ParseTuple(args, "y*O!w*KKK", &descs, &PyList_Type, &frames, &mem, &pl.base, &pl.size,
                          &pl.count))
        return NULL;
    PyObject *cmpls = NULL, *result = NULL;
    Py_ssize_t n = descs.len / DESC_SIZE, nf = PyList_GET_SIZE(frames);
    if (descs.len % DESC_SIZE) {
        PyErr_SetString(PyExc_ValueError, "rx_batch: descriptors are not whole 16-byte entries");
        goto out;
    }
    cmpls = PyBytes_FromStringAndSize(NULL, n * CMPL_SIZE);
    if (cmpls == NULL)
        goto out;
    unsigned char *cp = (unsigned char *)PyBytes_AS_STRING(cmpls);
    const unsigned char *dp = (const unsigned char *)descs.buf;
    long long nbytes = 0;
    long bad_len = 0, bad_buf = 0, bad_flags = 0, too_big = 0, delivered = 0;
    Py_ssize_t i = 0, j = 0, k = 0;
    while (i < n && j < nf) {
        struct desc d = get_desc(dp + i * DESC_SIZE);
        unsigned long long gpa = 0;
        int status = window(&d, &pl, mem.len, &gpa);
        if (status == 1)
            break; /* a granted page: Python's */
        if (status < 0) {
            count_refusal(status, &bad_len, &bad_buf, &bad_flags);
            put_cmpl(cp + k++ * CMPL_SIZE, d.id, 0, (int16_t)status);
            i++;
            continue;
        }
        PyObject *frame = PyList_GET_ITEM(frames, j);
        if (!PyBytes_Check(frame)) {
            PyErr_SetString(PyExc_TypeError, "rx_batch: frames must be bytes");
            goto out;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(frame);
        j++;
        if (len > d.len) { /* cannot fit the buffer it is due in: drop the frame, keep the buffer */
            too_big++;
            continue;
        }
        memcpy((char *)mem.buf + gpa, PyBytes_AS_STRING(frame), (size_t)len); /* the DMA write */
        put_cmpl(cp + k++ * CMPL_SIZE, d.id, (uint16_t)len, 0);
        i++;
        delivered++;
        nbytes += len;
    }
    if (_PyBytes_Resize(&cmpls, k * CMPL_SIZE) < 0)
        goto out;
    result = Py_BuildValue("OnnlLllll", cmpls, i, j, delivered, nbytes, too_big, bad_len, bad_buf, bad_flags);
out:
    Py_XDECREF(cmpls);
    PyBuffer_Release(&descs);
    PyBuffer_Release(&mem);
    return result;
}

static PyMethodDef methods[] = {
    {"tx_batch", tx_batch, METH_VARARGS,
     "tx_batch(descs, mem, pool_base, pool_size, pool_count, start) -> (frames, cmpls, end, nbytes, "
     "bad_len, bad_buf, bad_flags): send descriptors from index start until a granted page (end)."},
    {"rx_batch", rx_batch, METH_VARARGS,
     "rx_batch(descs, frames, mem, pool_base, pool_size, pool_count) -> (cmpls, descs_used, frames_used, "
     "delivered, nbytes, too_big, bad_len, bad_buf, bad_flags): write frames into posted buffers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pvio.backends._snic_dma",
    "The smart NIC's DMA loops in C (backends/smartnic.py holds the Python reference).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__snic_dma(void) { return PyModule_Create(&module); }
