/*
 * pvio.backends._snic_dma: the smart NIC's DMA loops, one call per batch of descriptors.
 *
 * backends/smartnic.py takes a batch of descriptors from a ring (ring.c copies each out of
 * the shared page once) and hands the copy here: for each descriptor this checks it exactly
 * as the Python reference does (``tx_guest_batch_py``, ``rx_batch_py``, ``rx_area_batch_py``,
 * ``area_copy_py`` in smartnic_dma.py, held equal to this by tests/test_smartnic_dma.py), moves
 * the frame between guest memory and the device's side and writes the completion.  A
 * descriptor naming a granted page (SNIC_F_GREF, well formed) needs the grant table, which is
 * Python's: the loop stops before it and returns its index, and smartnic.py serves that one
 * descriptor and calls again for the rest.
 *
 * The switch's batch path: tx_guest_batch leaves TX frames in guest memory as a switch batch
 * (struct np_frame entries, netpath.h's layout, positions = guest addresses) and snapshots
 * their headers, which the switch decides on; rx_area_batch writes frames of a batch from
 * where they lie (the sender's memory, or an area: every page a frame touches is checked)
 * into the buffers a guest posted, the checked headers over them; area_copy copies frames of
 * a batch into an area of the device's own, area_bytes copies them out as bytes,
 * frame_entries gathers their entries.
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

#include "../../pvio/core/native/netpath.h" /* struct np_frame: the switch's batches (one definition) */

#define DESC_SIZE 16
#define CMPL_SIZE 8
#define F_GREF 0x1u
#define E_BAD_BUF (-1)
#define E_BAD_LEN (-3)
#define E_BAD_FLAGS (-4)
#define ETH_HEADER_LEN 14
#define PAGE 4096u
#define STOP_END 0     /* every descriptor done */
#define STOP_GRANTED 1 /* stopped before a granted page (Python's) */
#define STOP_FULL 2    /* stopped: the area or the frame table is full (send what is there, go on) */
/* A frame's checked header: its first ETH_HEADER_LEN bytes, snapshotted by tx_guest_batch, at
 * HDR_STRIDE * k in a header buffer for frame k (the module exports it: one definition). */
#define HDR_STRIDE 16

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

/* tx_guest_batch(descs, mem, pool_base, pool_size, pool_count, start, frames, heads, hdrs, nf)
 *   -> (cmpls, end, stop, nf, nbytes, bad_len, bad_buf, bad_flags)
 * Send descriptors from index start as a switch batch that stays in guest memory: each good
 * frame is entered as ``struct np_frame`` number nf of ``frames`` with its guest-physical address
 * as position (guest memory is the batch's area, page i at bytes i*4096..), and its header -- the
 * first 14 bytes, the only ones the switch's decision reads -- is copied into ``hdrs`` at
 * HDR_STRIDE * nf and entered in ``heads`` at that position: the decision runs on this snapshot,
 * which the guest cannot change, and every copy of the frame made later writes it over the
 * header it reads from guest memory.  The descriptors' checks are window()'s (a length below the
 * Ethernet header: bad_len); stop is
 * STOP_END, STOP_GRANTED or STOP_FULL (the frame tables are full). */
static PyObject *tx_guest_batch(PyObject *self, PyObject *args)
{
    Py_buffer descs, mem, frames, heads, hdrs;
    struct pool pl;
    Py_ssize_t start, nf;
    if (!PyArg_ParseTuple(args, "y*y*KKKnw*w*w*n", &descs, &mem, &pl.base, &pl.size, &pl.count, &start, &frames,
                          &heads, &hdrs, &nf))
        return NULL;
    PyObject *cmpls = NULL, *result = NULL;
    Py_ssize_t n = descs.len / DESC_SIZE, cap = frames.len / (Py_ssize_t)sizeof(struct np_frame);
    if (heads.len / (Py_ssize_t)sizeof(struct np_frame) < cap)
        cap = heads.len / (Py_ssize_t)sizeof(struct np_frame);
    if (hdrs.len / HDR_STRIDE < cap)
        cap = hdrs.len / HDR_STRIDE;
    if (descs.len % DESC_SIZE || start < 0 || start > n || nf < 0 || nf > cap) {
        PyErr_SetString(PyExc_ValueError, "tx_guest_batch: partial descriptors, or start/nf out of range");
        goto out;
    }
    cmpls = PyBytes_FromStringAndSize(NULL, (n - start) * CMPL_SIZE);
    if (cmpls == NULL)
        goto out;
    unsigned char *cp = (unsigned char *)PyBytes_AS_STRING(cmpls), *hp = hdrs.buf;
    const unsigned char *dp = (const unsigned char *)descs.buf;
    struct np_frame *fr = frames.buf, *hd = heads.buf;
    long long nbytes = 0;
    long bad_len = 0, bad_buf = 0, bad_flags = 0;
    int stop = STOP_END;
    Py_ssize_t i = start, k = 0;
    for (; i < n; i++) {
        struct desc d = get_desc(dp + i * DESC_SIZE);
        unsigned long long gpa = 0;
        int status = d.len < ETH_HEADER_LEN ? E_BAD_LEN : window(&d, &pl, mem.len, &gpa);
        if (status == 1) {
            stop = STOP_GRANTED;
            break;
        }
        if (status < 0) {
            count_refusal(status, &bad_len, &bad_buf, &bad_flags);
            put_cmpl(cp + k++ * CMPL_SIZE, d.id, 0, (int16_t)status);
            continue;
        }
        if (nf == cap) {
            stop = STOP_FULL;
            break;
        }
        unsigned char *h = hp + nf * HDR_STRIDE;
        memcpy(h, (const char *)mem.buf + gpa, ETH_HEADER_LEN); /* the header snapshot */
        memset(h + ETH_HEADER_LEN, 0, HDR_STRIDE - ETH_HEADER_LEN);
        fr[nf].pos = gpa, fr[nf].len = d.len, fr[nf].pad = 0;
        hd[nf].pos = (uint64_t)nf * HDR_STRIDE, hd[nf].len = d.len, hd[nf].pad = 0;
        nf++;
        nbytes += d.len;
        put_cmpl(cp + k++ * CMPL_SIZE, d.id, d.len, 0);
    }
    if (_PyBytes_Resize(&cmpls, k * CMPL_SIZE) < 0)
        goto out;
    result = Py_BuildValue("OninLlll", cmpls, i, stop, nf, nbytes, bad_len, bad_buf, bad_flags);
out:
    Py_XDECREF(cmpls);
    PyBuffer_Release(&descs);
    PyBuffer_Release(&mem);
    PyBuffer_Release(&frames);
    PyBuffer_Release(&heads);
    PyBuffer_Release(&hdrs);
    return result;
}

/* The frames an RX batch writes: a list of bytes, or frames of a switch batch where they lie
 * in an area (struct np_frame entries, optionally through an index array). */
struct source {
    PyObject *list;           /* list of bytes, or NULL */
    const uint8_t *amem;      /* the area's memory */
    Py_ssize_t amem_len;
    const uint64_t *gfn;      /* the area's pages, or NULL: the area is amem itself (guest memory) */
    Py_ssize_t npages;
    const uint8_t *hdr;       /* checked headers (HDR_STRIDE apart, by frame number), or NULL */
    Py_ssize_t nhdr;
    const struct np_frame *fr; /* the batch's frames */
    Py_ssize_t nfr;
    const uint32_t *idx;      /* which of them, or NULL: all in order */
    Py_ssize_t n;             /* frames in this source */
};

/* Frame j's length, checking every page it lies in is inside the area's memory (-1: a broken
 * batch, with ValueError set).  A frame of up to a page lies in one page; a longer one in
 * consecutive area pages from a page boundary, as pvio_np_place lays them. */
static Py_ssize_t source_len(const struct source *s, Py_ssize_t j, const struct np_frame **out)
{
    if (s->list != NULL) {
        PyObject *f = PyList_GET_ITEM(s->list, j);
        if (!PyBytes_Check(f)) {
            PyErr_SetString(PyExc_TypeError, "rx_batch: frames must be bytes");
            return -1;
        }
        return PyBytes_GET_SIZE(f);
    }
    Py_ssize_t k = s->idx != NULL ? (Py_ssize_t)s->idx[j] : j;
    if (k >= s->nfr || (s->gfn != NULL && s->npages <= 0) || (s->hdr != NULL && k >= s->nhdr))
        goto bad;
    const struct np_frame *f = &s->fr[k];
    for (uint64_t done = 0; done < f->len;) {
        uint64_t pos = f->pos + done, off = pos & (PAGE - 1);
        uint64_t chunk = f->len - done < PAGE - off ? f->len - done : PAGE - off;
        uint64_t page = s->gfn != NULL ? s->gfn[(pos >> 12) % (uint64_t)s->npages] : pos >> 12;
        if (page > ((uint64_t)s->amem_len >> 12) || (page << 12) + off + chunk > (uint64_t)s->amem_len)
            goto bad;
        done += chunk;
    }
    *out = f;
    return f->len;
bad:
    PyErr_SetString(PyExc_ValueError, "rx_batch: a batch frame outside its area");
    return -1;
}

/* Copy frame j (its length checked by source_len) to dst, its checked header over the first
 * bytes when the source has headers. */
static void source_copy(const struct source *s, Py_ssize_t j, const struct np_frame *f, char *dst)
{
    if (s->list != NULL) {
        PyObject *b = PyList_GET_ITEM(s->list, j);
        memcpy(dst, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
        return;
    }
    for (uint64_t done = 0; done < f->len;) {
        uint64_t pos = f->pos + done, off = pos & (PAGE - 1);
        uint64_t chunk = f->len - done < PAGE - off ? f->len - done : PAGE - off;
        uint64_t page = s->gfn != NULL ? s->gfn[(pos >> 12) % (uint64_t)s->npages] : pos >> 12;
        memmove(dst + done, s->amem + (page << 12) + off, (size_t)chunk); /* may overlap: same guest */
        done += chunk;
    }
    if (s->hdr != NULL) {
        Py_ssize_t k = s->idx != NULL ? (Py_ssize_t)s->idx[j] : j;
        memcpy(dst, s->hdr + k * HDR_STRIDE, f->len < ETH_HEADER_LEN ? f->len : ETH_HEADER_LEN);
    }
}

/* The RX loop over any source -> (cmpls, descs_used, frames_used, delivered, nbytes, too_big,
 * bad_len, bad_buf, bad_flags). */
static PyObject *rx_loop(const unsigned char *dp, Py_ssize_t dlen, const struct source *src, Py_buffer *mem,
                         const struct pool *pl)
{
    PyObject *cmpls = NULL, *result = NULL;
    Py_ssize_t n = dlen / DESC_SIZE, nf = src->n;
    if (dlen % DESC_SIZE) {
        PyErr_SetString(PyExc_ValueError, "rx_batch: descriptors are not whole 16-byte entries");
        return NULL;
    }
    cmpls = PyBytes_FromStringAndSize(NULL, n * CMPL_SIZE);
    if (cmpls == NULL)
        return NULL;
    unsigned char *cp = (unsigned char *)PyBytes_AS_STRING(cmpls);
    long long nbytes = 0;
    long bad_len = 0, bad_buf = 0, bad_flags = 0, too_big = 0, delivered = 0;
    Py_ssize_t i = 0, j = 0, k = 0;
    while (i < n && j < nf) {
        struct desc d = get_desc(dp + i * DESC_SIZE);
        unsigned long long gpa = 0;
        int status = window(&d, pl, mem->len, &gpa);
        if (status == 1)
            break; /* a granted page: Python's */
        if (status < 0) {
            count_refusal(status, &bad_len, &bad_buf, &bad_flags);
            put_cmpl(cp + k++ * CMPL_SIZE, d.id, 0, (int16_t)status);
            i++;
            continue;
        }
        const struct np_frame *f = NULL;
        Py_ssize_t len = source_len(src, j, &f);
        if (len < 0)
            goto out;
        j++;
        if (len > d.len) { /* cannot fit the buffer it is due in: drop the frame, keep the buffer */
            too_big++;
            continue;
        }
        source_copy(src, j - 1, f, (char *)mem->buf + gpa); /* the DMA write */
        put_cmpl(cp + k++ * CMPL_SIZE, d.id, (uint16_t)len, 0);
        i++;
        delivered++;
        nbytes += len;
    }
    if (_PyBytes_Resize(&cmpls, k * CMPL_SIZE) < 0)
        return NULL; /* cmpls freed by the resize */
    result = Py_BuildValue("OnnlLllll", cmpls, i, j, delivered, nbytes, too_big, bad_len, bad_buf, bad_flags);
out:
    Py_XDECREF(cmpls);
    return result;
}

/* The buffers of a switch batch, as rx_area_batch and area_bytes take them: the area's memory,
 * its page numbers (optional: None for an area that is the memory itself), the frame entries,
 * an index array (optional) and the checked headers (optional). */
struct batch_args {
    Py_buffer amem, gfns, frames, idx, hdrs;
};

static int opt_buffer(PyObject *obj, Py_buffer *view)
{
    memset(view, 0, sizeof *view);
    return obj == Py_None ? 0 : PyObject_GetBuffer(obj, view, PyBUF_SIMPLE);
}

static void release_batch(struct batch_args *b)
{
    PyBuffer_Release(&b->amem);
    PyBuffer_Release(&b->frames);
    if (b->gfns.obj != NULL)
        PyBuffer_Release(&b->gfns);
    if (b->idx.obj != NULL)
        PyBuffer_Release(&b->idx);
    if (b->hdrs.obj != NULL)
        PyBuffer_Release(&b->hdrs);
}

/* Fill src from the buffers (idx_obj None: frames 0..n-1); 0, or -1 with an exception set.  The
 * optional buffers are taken here: release_batch lets go of whatever was taken, on any path. */
static int batch_source(struct batch_args *b, PyObject *gfns_obj, PyObject *idx_obj, PyObject *hdrs_obj,
                        Py_ssize_t n, struct source *src)
{
    memset(&b->gfns, 0, sizeof b->gfns), memset(&b->idx, 0, sizeof b->idx), memset(&b->hdrs, 0, sizeof b->hdrs);
    if (opt_buffer(gfns_obj, &b->gfns) < 0 || opt_buffer(idx_obj, &b->idx) < 0 || opt_buffer(hdrs_obj, &b->hdrs) < 0)
        return -1;
    *src = (struct source){
        .amem = b->amem.buf, .amem_len = b->amem.len,
        .gfn = b->gfns.obj != NULL ? b->gfns.buf : NULL, .npages = b->gfns.len / 8,
        .hdr = b->hdrs.obj != NULL ? b->hdrs.buf : NULL, .nhdr = b->hdrs.len / HDR_STRIDE,
        .fr = b->frames.buf, .nfr = b->frames.len / (Py_ssize_t)sizeof(struct np_frame),
        .idx = b->idx.obj != NULL ? b->idx.buf : NULL, .n = n,
    };
    if (n < 0 || (b->idx.obj != NULL ? b->idx.len / 4 : src->nfr) < n || b->gfns.len % 8 ||
        b->frames.len % (Py_ssize_t)sizeof(struct np_frame)) {
        PyErr_SetString(PyExc_ValueError, "snic_dma: n past the batch's frames, or a partial entry");
        return -1;
    }
    return 0;
}

/* area_bytes(area_mem, gfns, frames, idx, n, hdrs=None) -> list of bytes: frames of a switch
 * batch copied out (one copy each, the checked header over each when given), for a port that
 * needs bytes or the RX queue when the guest has no buffers for them yet. */
static PyObject *area_bytes(PyObject *self, PyObject *args)
{
    struct batch_args b;
    PyObject *gfns_obj, *idx_obj, *hdrs_obj = Py_None, *out = NULL;
    Py_ssize_t n;
    struct source src;
    if (!PyArg_ParseTuple(args, "y*Oy*On|O", &b.amem, &gfns_obj, &b.frames, &idx_obj, &n, &hdrs_obj))
        return NULL;
    if (batch_source(&b, gfns_obj, idx_obj, hdrs_obj, n, &src) < 0)
        goto out;
    out = PyList_New(n);
    if (out == NULL)
        goto out;
    for (Py_ssize_t j = 0; j < n; j++) {
        const struct np_frame *f = NULL;
        Py_ssize_t len = source_len(&src, j, &f);
        PyObject *frame = len < 0 ? NULL : PyBytes_FromStringAndSize(NULL, len);
        if (frame == NULL) {
            Py_CLEAR(out);
            goto out;
        }
        source_copy(&src, j, f, PyBytes_AS_STRING(frame));
        PyList_SET_ITEM(out, j, frame);
    }
out:
    release_batch(&b);
    return out;
}

/* area_copy(area_mem, gfns, frames, idx, n, hdrs, dst, dst_frames, head) -> (copied, head, nbytes)
 * Copy frames idx[0..n) of a switch batch (the checked header over each when hdrs is given)
 * into the contiguous area dst at head, placed as pvio_np_place places, frame j entered as
 * ``struct np_frame`` j of dst_frames: a batch left in guest memory made the device's own, for
 * a port that keeps frames past the call.  Stops early when dst or dst_frames is full. */
static PyObject *area_copy(PyObject *self, PyObject *args)
{
    struct batch_args b;
    Py_buffer dst, dfr;
    PyObject *gfns_obj, *idx_obj, *hdrs_obj, *result = NULL;
    Py_ssize_t n;
    unsigned long long head;
    struct source src;
    if (!PyArg_ParseTuple(args, "y*Oy*OnOw*w*K", &b.amem, &gfns_obj, &b.frames, &idx_obj, &n, &hdrs_obj, &dst,
                          &dfr, &head))
        return NULL;
    if (batch_source(&b, gfns_obj, idx_obj, hdrs_obj, n, &src) < 0)
        goto out;
    if (head > (unsigned long long)dst.len) {
        PyErr_SetString(PyExc_ValueError, "area_copy: head past the area");
        goto out;
    }
    struct np_frame *dfo = dfr.buf;
    Py_ssize_t cap = dfr.len / (Py_ssize_t)sizeof(struct np_frame), j = 0;
    long long nbytes = 0;
    for (; j < n && j < cap; j++) {
        const struct np_frame *f = NULL;
        Py_ssize_t len = source_len(&src, j, &f);
        if (len < 0)
            goto out;
        unsigned long long p = head, off = p & (PAGE - 1);
        if (off && ((unsigned long long)len > PAGE || off + (unsigned long long)len > PAGE))
            p = (p + PAGE - 1) & ~(unsigned long long)(PAGE - 1);
        if (p + (unsigned long long)len > (unsigned long long)dst.len)
            break;
        source_copy(&src, j, f, (char *)dst.buf + p);
        dfo[j].pos = p, dfo[j].len = (uint32_t)len, dfo[j].pad = 0;
        head = p + (unsigned long long)len;
        nbytes += len;
    }
    result = Py_BuildValue("nKL", j, head, nbytes);
out:
    release_batch(&b);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&dfr);
    return result;
}

/* frame_entries(frames, idx, n) -> bytes: the ``struct np_frame`` entries idx[0..n) of frames (idx
 * None: the first n), gathered: where a switch batch's frames lie, kept while they wait. */
static PyObject *frame_entries(PyObject *self, PyObject *args)
{
    Py_buffer frames, idx = {0};
    PyObject *idx_obj, *out = NULL;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*On", &frames, &idx_obj, &n))
        return NULL;
    Py_ssize_t nfr = frames.len / (Py_ssize_t)sizeof(struct np_frame);
    if (idx_obj != Py_None && PyObject_GetBuffer(idx_obj, &idx, PyBUF_SIMPLE) < 0)
        goto out;
    if (n < 0 || (idx.obj != NULL ? idx.len / 4 : nfr) < n) {
        PyErr_SetString(PyExc_ValueError, "frame_entries: n past the frames");
        goto out;
    }
    out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(struct np_frame));
    if (out == NULL)
        goto out;
    struct np_frame *dst = (struct np_frame *)PyBytes_AS_STRING(out);
    const struct np_frame *src = frames.buf;
    const uint32_t *ix = idx.obj != NULL ? idx.buf : NULL;
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t k = ix != NULL ? (Py_ssize_t)ix[j] : j;
        if (k >= nfr) {
            Py_CLEAR(out);
            PyErr_SetString(PyExc_ValueError, "frame_entries: an index past the frames");
            goto out;
        }
        dst[j] = src[k];
    }
out:
    if (idx.obj != NULL)
        PyBuffer_Release(&idx);
    PyBuffer_Release(&frames);
    return out;
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
    struct source src = {.list = frames, .n = PyList_GET_SIZE(frames)};
    PyObject *result = rx_loop(descs.buf, descs.len, &src, &mem, &pl);
    PyBuffer_Release(&descs);
    PyBuffer_Release(&mem);
    return result;
}

/* rx_area_batch(descs, area_mem, gfns, frames, idx, n, mem, pool_base, pool_size, pool_count,
 *               hdrs=None)
 *   -> as rx_batch: frames of a switch batch (``struct np_frame`` entries in the buffer frames, the
 *   area's page numbers as uint64 in gfns or None when the area is area_mem itself, idx: uint32
 *   indices into frames, or None for 0..n-1) written straight from the area into the guest's
 *   buffers, each with its checked header (hdrs, HDR_STRIDE apart by frame number) over its
 *   first bytes when given: the one copy of a frame from a sender's memory to a receiver's. */
static PyObject *rx_area_batch(PyObject *self, PyObject *args)
{
    struct batch_args b;
    Py_buffer descs, mem;
    PyObject *gfns_obj, *idx_obj, *hdrs_obj = Py_None, *result = NULL;
    Py_ssize_t n;
    struct pool pl;
    struct source src;
    if (!PyArg_ParseTuple(args, "y*y*Oy*Onw*KKK|O", &descs, &b.amem, &gfns_obj, &b.frames, &idx_obj, &n, &mem,
                          &pl.base, &pl.size, &pl.count, &hdrs_obj))
        return NULL;
    if (batch_source(&b, gfns_obj, idx_obj, hdrs_obj, n, &src) == 0)
        result = rx_loop(descs.buf, descs.len, &src, &mem, &pl);
    release_batch(&b);
    PyBuffer_Release(&descs);
    PyBuffer_Release(&mem);
    return result;
}

static PyMethodDef methods[] = {
    {"tx_guest_batch", tx_guest_batch, METH_VARARGS,
     "tx_guest_batch(descs, mem, pool_base, pool_size, pool_count, start, frames, heads, hdrs, nf) -> (cmpls, "
     "end, stop, nf, nbytes, bad_len, bad_buf, bad_flags): send descriptors as a batch left in guest memory."},
    {"rx_area_batch", rx_area_batch, METH_VARARGS,
     "rx_area_batch(descs, area_mem, gfns, frames, idx, n, mem, pool_base, pool_size, pool_count, hdrs=None) -> as "
     "rx_batch, for frames of a switch batch where they lie."},
    {"area_copy", area_copy, METH_VARARGS,
     "area_copy(area_mem, gfns, frames, idx, n, hdrs, dst, dst_frames, head) -> (copied, head, nbytes): frames "
     "of a switch batch copied into a contiguous area."},
    {"frame_entries", frame_entries, METH_VARARGS,
     "frame_entries(frames, idx, n) -> bytes: struct np_frame entries idx[0..n) of frames, gathered."},
    {"area_bytes", area_bytes, METH_VARARGS,
     "area_bytes(area_mem, gfns, frames, idx, n, hdrs=None) -> frames of a switch batch as bytes (one copy each)."},
    {"rx_batch", rx_batch, METH_VARARGS,
     "rx_batch(descs, frames, mem, pool_base, pool_size, pool_count) -> (cmpls, descs_used, frames_used, "
     "delivered, nbytes, too_big, bad_len, bad_buf, bad_flags): write frames into posted buffers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pvio.backends._snic_dma",
    "The smart NIC's DMA loops in C (backends/smartnic_dma.py holds the Python reference).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__snic_dma(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "HDR_STRIDE", HDR_STRIDE) < 0)
        Py_CLEAR(m);
    return m;
}
