/*
 * Greedy longest-match byte tokenizer over a flattened trie (RWKV World tokenizer).
 *
 * Optional accelerator for megatron_rwkvx.data.rwkv_trie: the pure-Python path there produces the
 * same ids and is used when this module is not built. The trie arrays are built in Python
 * (rwkv_trie.FlatTrie); this file only walks them, with the GIL released so that threads scale.
 *
 * Layout: nodes are numbered in (length, bytes) order, root = 0. The children of node v are the
 * nodes first_child[v] .. first_child[v] + n_children[v] - 1, sorted by node_byte; token_id[v] is
 * the token whose bytes spell the path to v, or 0 when that path is only a prefix.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static inline int32_t find_child(const uint8_t *node_byte, const int32_t *first_child,
                                 const int32_t *n_children, int32_t node, uint8_t byte) {
    int32_t lo = first_child[node];
    int32_t n = n_children[node];
    if (n == 256) /* every byte present: children are indexed by the byte itself */
        return lo + byte;
    if (n <= 8) {
        for (int32_t i = lo; i < lo + n; i++) {
            if (node_byte[i] == byte) return i;
            if (node_byte[i] > byte) return -1;
        }
        return -1;
    }
    int32_t hi = lo + n - 1;
    while (lo <= hi) {
        int32_t mid = (lo + hi) >> 1;
        uint8_t b = node_byte[mid];
        if (b == byte) return mid;
        if (b < byte) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
}

/* encode(data, node_byte, first_child, n_children, token_id, out) -> number of ids written.
 * Returns -(position + 1) when no token starts at `position` (a vocabulary without that byte). */
static PyObject *encode(PyObject *self, PyObject *args) {
    Py_buffer data, nb, fc, nc, tid, out;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*", &data, &nb, &fc, &nc, &tid, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n_nodes = nb.len;
    if (fc.len != n_nodes * 4 || nc.len != n_nodes * 4 || tid.len != n_nodes * 4) {
        PyErr_SetString(PyExc_ValueError, "trie arrays disagree in length");
        goto done;
    }
    if (out.len < data.len * 4) {
        PyErr_SetString(PyExc_ValueError, "output buffer needs room for one int32 per input byte");
        goto done;
    }
    const uint8_t *src = (const uint8_t *)data.buf;
    const uint8_t *node_byte = (const uint8_t *)nb.buf;
    const int32_t *first_child = (const int32_t *)fc.buf;
    const int32_t *n_children = (const int32_t *)nc.buf;
    const int32_t *token_id = (const int32_t *)tid.buf;
    int32_t *dst = (int32_t *)out.buf;
    Py_ssize_t len = data.len, pos = 0, written = 0, failed_at = -1;

    Py_BEGIN_ALLOW_THREADS
    while (pos < len) {
        int32_t node = 0, best = 0;
        Py_ssize_t j = pos, best_end = pos;
        while (j < len) {
            node = find_child(node_byte, first_child, n_children, node, src[j]);
            if (node < 0) break;
            j++;
            if (token_id[node]) { best = token_id[node]; best_end = j; }
        }
        if (best_end == pos) { failed_at = pos; break; }
        dst[written++] = best;
        pos = best_end;
    }
    Py_END_ALLOW_THREADS

    result = PyLong_FromSsize_t(failed_at >= 0 ? -(failed_at + 1) : written);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&nb);
    PyBuffer_Release(&fc);
    PyBuffer_Release(&nc);
    PyBuffer_Release(&tid);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS,
     "encode(data, node_byte, first_child, n_children, token_id, out) -> count (negative: "
     "-(position+1) of a byte that starts no token)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rwkv_trie",
                                    "Greedy longest-match trie walk (C).", -1, methods};

PyMODINIT_FUNC PyInit__rwkv_trie(void) { return PyModule_Create(&module); }
