# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The leader's hot-path queues: a ready queue and a timer queue.

``ReadyQueue`` orders tasks by priority (higher first), then by submission
sequence (lower first, so FIFO within a priority).  ``TimerQueue`` orders
deadlines -- eta, retry backoff, cron ticks, lease expiry -- by due time, ties
in push order, and hands back everything due by "now" in one call.

Layout.  Both are a 4-ary min-heap of 24-byte C structs (two int64 order
keys and a slot number).  Python tuples would cost an allocation per entry
and a rich comparison per heap step (DESIGN.md: heapq push+pop at 10^6
entries 3.8 us, a bare C heap 0.52 us); 4 children per node halve the depth
of a binary heap.  Each entry carries one Python object, its key (a task id),
to which the queue holds one strong reference.

Removal by key (cancel, reschedule) is O(log n) through a key table: an
open-addressing hash table in C (linear probing, load <= 2/3) whose 16-byte
slots hold the key, 32 bits of its hash and the heap index of its entry; each
heap entry holds its key's slot number, and sifts update the moved entries'
slots.  A first version used a Python dict key -> handle: at 10^6 entries
its delete was ~40% of a pop (str object, dict index and dict entry are three
dependent cache misses, plus an int object per push and periodic full-dict
rebuilds).  Pop never hashes or compares a key, so pop, pop_many and pop_due
run no Python code and cannot fail halfway.

At 10^6 entries the time goes to cache and TLB misses, so arrays of 8 MiB and
up are 2 MiB-aligned and marked MADV_HUGEPAGE (Linux; THP is commonly in
"madvise" mode), ~10% off push+pop; 16-byte slots instead of 24 gave ~7%.

Keys follow dict rules: hashable, compared with == after a hash match, and
the first-pushed object is the one kept and returned.  Their __hash__/__eq__
must not modify the same queue (str, int, bytes and tuples of them never
call Python code); if one does, RuntimeError is raised instead of the heap
being corrupted.  Key references are not visited by the cycle collector, so
a key should not refer back to its queue.  No locking: a queue belongs to one
thread (the leader's loop).

Time unit of TimerQueue: integer microseconds (int64), e.g.
``time.time_ns() // 1000``.  Integers compare exactly, so due times carried
in Raft entries order the same on every replica; floats are rejected with
TypeError so a seconds value can't be mistaken for microseconds.
"""

cimport cython
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from cpython.number cimport PyNumber_Index
from cpython.object cimport Py_EQ, PyObject_Hash, PyObject_RichCompareBool
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from *:
    """
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    static void dtask_fq_advise_huge(void *p, size_t n) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        (void)madvise(p, n, MADV_HUGEPAGE);  /* only a hint: errors don't matter */
    #endif
    }
    """
    void advise_huge "dtask_fq_advise_huge" (void* p, size_t n) noexcept nogil


ctypedef struct Entry:      # one heap element, 24 bytes
    int64_t a               # primary order key: smaller pops first
    int64_t b               # tie-break: smaller pops first
    int32_t slot            # key table slot of this entry's key

ctypedef struct Slot:       # one key table element, 16 bytes
    PyObject* key           # owned reference; NULL marks an empty slot
    uint32_t hash           # folded hash, so probes and rehashes call no Python
    int32_t pos             # heap index of this key's entry

cdef enum:
    ARITY = 4
    MIN_CAPACITY = 16

# ~50 GB of queue; keeps table size <= 2^31, so slot numbers fit int32_t.
cdef Py_ssize_t MAX_ENTRIES = <Py_ssize_t>1 << 30
cdef size_t HUGE_PAGE = 2 * 1024 * 1024


cdef inline bint before(const Entry* x, const Entry* y) noexcept nogil:
    return x.a < y.a or (x.a == y.a and x.b < y.b)


cdef inline int64_t as_int64(object x) except? -1:
    # Cython's implicit conversion would truncate a float via __int__, and a
    # float here is most likely seconds where microseconds are expected.
    if not PyLong_Check(x):
        x = PyNumber_Index(x)  # TypeError for float; accepts numpy integers
    return x  # OverflowError outside int64


cdef void* alloc_array(size_t nbytes, bint zeroed, void** base) noexcept:
    """PyMem allocation, 2 MiB-aligned and huge-page advised when big.

    Returns the aligned pointer (NULL when out of memory); *base gets the
    pointer to hand to PyMem_Free.
    """
    cdef size_t extra = HUGE_PAGE if nbytes >= 4 * HUGE_PAGE else 0
    cdef char* raw = <char*>(PyMem_Calloc(nbytes + extra, 1) if zeroed
                             else PyMem_Malloc(nbytes + extra))
    cdef size_t aligned
    base[0] = raw
    if raw == NULL or extra == 0:
        return raw
    aligned = (<size_t>raw + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    advise_huge(<void*>aligned, nbytes & ~(HUGE_PAGE - 1))
    return <void*>aligned


@cython.auto_pickle(False)
cdef class _KeyedHeap:
    """Heap storage and key table shared by ReadyQueue and TimerQueue.

    Invariants, holding between calls (n = _size, T = table size = _mask + 1):
      heap order: for 0 < i < n, not before(heap[i], heap[(i - 1) // ARITY]),
        so heap[0] is the entry that pops next;
      links: for i < n, s = heap[i].slot has slots[s].key != NULL and
        slots[s].pos == i; exactly n slots are non-empty;
      probing: a key sits at or after its home slot (home(hash)) with no empty
        slot in between, cyclically; T is a power of 2 and n * 3 <= T * 2, so
        some slot is always empty and every probe loop ends;
      capacity: n <= _cap, the heap array's length.
    """

    cdef Entry* _heap
    cdef void* _heap_mem         # what to free for _heap (see alloc_array)
    cdef Py_ssize_t _size
    cdef Py_ssize_t _cap
    cdef Slot* _slots
    cdef void* _slots_mem        # what to free for _slots
    cdef Py_ssize_t _mask        # table size - 1
    cdef int _shift              # 64 - log2(table size), for home()
    cdef bint _busy              # running a key's __hash__/__eq__

    def __cinit__(self, *args, **kwargs):
        # Allocate here, not in __init__, so no method ever sees NULL arrays.
        self._reserve(MIN_CAPACITY)

    def __init__(self, Py_ssize_t capacity_hint=1024):
        """Preallocate room for capacity_hint entries (grows by doubling)."""
        if capacity_hint < 0:
            raise ValueError("capacity_hint must be >= 0")
        self._enter()
        self._reserve(capacity_hint)

    def __dealloc__(self):
        cdef Py_ssize_t i, n = self._size
        self._size = 0
        for i in range(n):
            Py_XDECREF(self._slots[self._heap[i].slot].key)
        PyMem_Free(self._heap_mem)
        PyMem_Free(self._slots_mem)

    def __len__(self):
        return self._size

    def __contains__(self, key):
        return self._find(key) >= 0

    def __repr__(self):
        return f"{type(self).__name__}(len={self._size})"

    def remove(self, key) -> bool:
        """Drop key from the queue in O(log n); False if it isn't queued."""
        self._enter()
        cdef Py_ssize_t s = self._find(key)
        if s < 0:
            return False
        cdef PyObject* kp = self._slots[s].key
        self._remove_at(self._slots[s].pos)
        self._free_slot(s)
        Py_XDECREF(kp)  # last: the key's __del__ may run and sees a consistent queue
        return True

    # -- guards and sizing -------------------------------------------------

    @cython.final
    cdef inline int _enter(self) except -1:
        # A mutation nested inside one of our __hash__/__eq__ calls would
        # invalidate the slot or heap index the outer call is holding.
        if self._busy:
            raise RuntimeError(
                f"{type(self).__name__} modified from a key's __hash__ or __eq__")
        return 0

    @cython.final
    cdef int _reserve(self, Py_ssize_t need) except -1:
        """Make room for `need` entries in both the heap and the key table."""
        cdef Py_ssize_t cap, tsize = self._mask + 1 if self._slots != NULL else 0
        cdef void* p
        cdef void* mem
        if need > MAX_ENTRIES:
            raise MemoryError(f"{need} entries is more than a queue can hold")
        if need > self._cap:
            cap = self._cap if self._cap >= MIN_CAPACITY else MIN_CAPACITY
            while cap < need:
                cap *= 2
            # Copy rather than realloc, to keep the huge-page alignment.
            p = alloc_array(cap * sizeof(Entry), False, &mem)
            if p == NULL:
                raise MemoryError()
            if self._size:
                memcpy(p, self._heap, self._size * sizeof(Entry))
            PyMem_Free(self._heap_mem)
            self._heap, self._heap_mem = <Entry*>p, mem
            self._cap = cap
        if need * 3 > tsize * 2:
            tsize = tsize if tsize >= MIN_CAPACITY else MIN_CAPACITY
            while need * 3 > tsize * 2:
                tsize *= 2
            self._rehash(tsize)
        return 0

    # -- key table -------------------------------------------------------

    @cython.final
    cdef inline Py_ssize_t _home(self, uint32_t hash) noexcept:
        # Fibonacci hashing: int keys hash to themselves, and without mixing,
        # ids like 0, 1024, 2048... would all land in one probe run.
        return <Py_ssize_t>((hash * <uint64_t>0x9E3779B97F4A7C15ULL) >> self._shift)

    @cython.final
    cdef int _rehash(self, Py_ssize_t tsize) except -1:
        """Move every key into a new table of tsize slots (a power of 2)."""
        cdef void* mem
        cdef Slot* new = <Slot*>alloc_array(tsize * sizeof(Slot), True, &mem)
        cdef Slot* old = self._slots
        cdef void* old_mem = self._slots_mem
        cdef Py_ssize_t i, s, bits = 0
        if new == NULL:
            raise MemoryError()
        while (<Py_ssize_t>1 << bits) < tsize:
            bits += 1
        self._slots, self._slots_mem = new, mem
        self._mask = tsize - 1
        self._shift = 64 - bits
        # Walk the heap rather than the old table: it lists exactly the live
        # slots, and each entry's slot number must be rewritten anyway.
        for i in range(self._size):
            s = self._home(old[self._heap[i].slot].hash)
            while new[s].key != NULL:
                s = (s + 1) & self._mask
            new[s] = old[self._heap[i].slot]
            self._heap[i].slot = <int32_t>s
        PyMem_Free(old_mem)
        return 0

    @cython.final
    cdef Py_ssize_t _probe(self, object key, uint32_t hash, bint* found) except -1:
        """The slot holding key (found = True) or the empty slot ending its run."""
        cdef Slot* slots = self._slots
        cdef Py_ssize_t s = self._home(hash)
        cdef bint was_busy
        cdef int eq
        found[0] = False
        while slots[s].key != NULL:
            if slots[s].key == <PyObject*>key:
                found[0] = True
                return s
            if slots[s].hash == hash:
                # Save/restore, not clear: a reader such as `in` may run
                # inside an outer call's __eq__.
                was_busy = self._busy
                self._busy = True
                try:
                    eq = PyObject_RichCompareBool(<object>slots[s].key, key, Py_EQ)
                finally:
                    self._busy = was_busy
                if eq:
                    found[0] = True
                    return s
            s = (s + 1) & self._mask
        return s

    @cython.final
    cdef inline uint32_t _hash(self, object key) except? 0xFFFFFFFF:
        """hash(key) folded to 32 bits (ints that differ only high up still differ)."""
        cdef bint was_busy = self._busy
        cdef uint64_t h
        self._busy = True
        try:
            h = <uint64_t>PyObject_Hash(key)
        finally:
            self._busy = was_busy
        return <uint32_t>(h ^ (h >> 32))

    @cython.final
    cdef Py_ssize_t _find(self, object key) except -2:
        """The slot holding key, or -1."""
        cdef bint found
        cdef Py_ssize_t s = self._probe(key, self._hash(key), &found)
        return s if found else -1

    @cython.final
    cdef void _free_slot(self, Py_ssize_t hole) noexcept:
        """Empty slot `hole` (its key reference is the caller's to drop).

        Backward-shift deletion: pull later keys of the probe run into the
        hole when their home allows it, so no tombstones pile up and lookups
        stay short without periodic cleanup.
        """
        cdef Slot* slots = self._slots
        cdef Py_ssize_t j = hole, home, mask = self._mask
        while True:
            j = (j + 1) & mask
            if slots[j].key == NULL:
                break
            home = self._home(slots[j].hash)
            # A key whose home lies cyclically in (hole, j] must stay after it.
            if (hole <= j and hole < home <= j) or (hole > j and (hole < home or home <= j)):
                continue
            slots[hole] = slots[j]
            self._heap[slots[hole].pos].slot = <int32_t>hole
            hole = j
        slots[hole].key = NULL

    @cython.final
    cdef Py_ssize_t _insert(self, object key, Entry* e) except -2:
        """Add key to the table and set e.slot; the caller then pushes e.

        If an equal key is already queued, nothing changes and its slot is
        returned instead of -1.
        """
        cdef bint found
        cdef Py_ssize_t s
        cdef uint32_t hash
        # Grow first: a rehash after probing would invalidate the slot found.
        if self._size == self._cap or (self._size + 1) * 3 > (self._mask + 1) * 2:
            self._reserve(self._size + 1)
        hash = self._hash(key)
        s = self._probe(key, hash, &found)
        if found:
            return s
        Py_INCREF(key)
        self._slots[s].key = <PyObject*>key
        self._slots[s].hash = hash
        e.slot = <int32_t>s
        return -1

    # -- heap ------------------------------------------------------------

    @cython.final
    cdef inline void _sift_up(self, Py_ssize_t i, Entry e) noexcept:
        """Place e at hole i or above it, moving later-popping parents down."""
        cdef Entry* heap = self._heap
        cdef Slot* slots = self._slots
        cdef Py_ssize_t parent
        while i > 0:
            parent = (i - 1) // ARITY
            if not before(&e, &heap[parent]):
                break
            heap[i] = heap[parent]
            slots[heap[i].slot].pos = <int32_t>i
            i = parent
        heap[i] = e
        slots[e.slot].pos = <int32_t>i

    @cython.final
    cdef inline void _sift_down(self, Py_ssize_t i, Entry e) noexcept:
        """Place e at hole i or below it, moving the first child up each level."""
        cdef Entry* heap = self._heap
        cdef Slot* slots = self._slots
        cdef Py_ssize_t n = self._size
        cdef Py_ssize_t child, best, end
        while True:
            child = i * ARITY + 1
            if child >= n:
                break
            end = child + ARITY if child + ARITY <= n else n
            best = child
            child += 1
            while child < end:
                if before(&heap[child], &heap[best]):
                    best = child
                child += 1
            if not before(&heap[best], &e):
                break
            heap[i] = heap[best]
            slots[heap[i].slot].pos = <int32_t>i
            i = best
        heap[i] = e
        slots[e.slot].pos = <int32_t>i

    @cython.final
    cdef inline void _place(self, Py_ssize_t i, Entry e) noexcept:
        """Put e into hole i and restore heap order around it."""
        if i > 0 and before(&e, &self._heap[(i - 1) // ARITY]):
            self._sift_up(i, e)
        else:
            self._sift_down(i, e)

    @cython.final
    cdef inline void _push_entry(self, Entry e) noexcept:
        """Append e, whose key _insert has just put in the table."""
        self._size += 1
        self._sift_up(self._size - 1, e)

    @cython.final
    cdef inline void _remove_at(self, Py_ssize_t i) noexcept:
        """Take heap[i] out; the caller frees its slot and key."""
        self._size -= 1
        if i != self._size:
            # The last entry fills the hole; it may belong above or below it.
            self._place(i, self._heap[self._size])

    @cython.final
    cdef object _pop_root(self):
        """Remove heap[0] and return its key; the caller checks size > 0."""
        cdef Py_ssize_t s = self._heap[0].slot
        cdef PyObject* kp = self._slots[s].key
        key = <object>kp
        self._remove_at(0)
        self._free_slot(s)
        Py_XDECREF(kp)  # `key` still holds a reference, handed to the caller
        return key


@cython.final
@cython.auto_pickle(False)
cdef class ReadyQueue(_KeyedHeap):
    """Tasks ready to run: highest priority first, then lowest seq (FIFO).

    ReadyQueue(capacity_hint=1024)
      push(key, priority, seq)  priority and seq: int64 ints; KeyError if key is queued
      pop() / peek()            IndexError when empty
      pop_many(n)               up to n keys in pop order
      remove(key) -> bool, priority_of(key), key in q, len(q)

    seq is expected to be unique (the leader's submission counter); entries
    with equal (priority, seq) pop in an unspecified order.
    """

    # Stored as a = ~priority (== -priority - 1): it reverses the order so the
    # min-heap pops the highest priority first, and unlike negation it cannot
    # overflow at INT64_MIN.

    def push(self, key, priority, seq) -> None:
        """Queue key; O(log n). KeyError if key is already queued."""
        cdef Entry e
        self._enter()
        e.a = ~as_int64(priority)
        e.b = as_int64(seq)
        if self._insert(key, &e) != -1:
            raise KeyError(f"{key!r} is already in the ReadyQueue")
        self._push_entry(e)

    def pop(self):
        """Remove and return the next key; IndexError when empty."""
        self._enter()
        if self._size == 0:
            raise IndexError("pop from an empty ReadyQueue")
        return self._pop_root()

    def peek(self):
        """Return the next key without removing it; IndexError when empty."""
        if self._size == 0:
            raise IndexError("peek at an empty ReadyQueue")
        return <object>self._slots[self._heap[0].slot].key

    def pop_many(self, Py_ssize_t n) -> list:
        """Remove and return up to n keys in pop order (fewer if the queue runs out)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        self._enter()
        if n > self._size:
            n = self._size
        cdef list out = []
        cdef Py_ssize_t i
        for i in range(n):
            out.append(self._pop_root())
        return out

    def priority_of(self, key) -> int:
        """The priority key was pushed with; KeyError if absent."""
        cdef Py_ssize_t s = self._find(key)
        if s < 0:
            raise KeyError(key)
        return ~self._heap[self._slots[s].pos].a


@cython.final
@cython.auto_pickle(False)
cdef class TimerQueue(_KeyedHeap):
    """Deadlines in int64 microseconds: earliest first, ties in push order.

    TimerQueue(capacity_hint=1024)
      push(key, due) -> bool      True if added; if key is already queued its
                                  timer moves to `due` (behind earlier pushes
                                  with the same due) and False is returned
      pop_due(now, limit=-1)      keys with due <= now in due order, at most
                                  `limit` of them if limit >= 0
      next_due()                  earliest due, or None when empty
      remove(key) -> bool, due_of(key), key in q, len(q)
    """

    cdef int64_t _pushes  # push counter: the tie-break between equal dues

    def push(self, key, due) -> bool:
        """Schedule key at `due` us, or reschedule it if queued; O(log n)."""
        cdef Entry e
        cdef Py_ssize_t s
        self._enter()
        e.a = as_int64(due)
        e.b = self._pushes
        self._pushes += 1
        s = self._insert(key, &e)
        if s == -1:
            self._push_entry(e)
            return True
        # Reschedule in place: same slot and key object, new order keys.
        e.slot = s
        self._place(self._slots[s].pos, e)
        return False

    def pop_due(self, now, Py_ssize_t limit=-1) -> list:
        """Remove and return every key with due <= now (at most limit if >= 0)."""
        cdef int64_t t = as_int64(now)
        cdef list out = []
        self._enter()
        while self._size > 0 and self._heap[0].a <= t and limit != 0:
            out.append(self._pop_root())
            limit -= 1
        return out

    def next_due(self):
        """The earliest due time (int us), or None when empty."""
        if self._size == 0:
            return None
        return self._heap[0].a

    def due_of(self, key) -> int:
        """The due time key is scheduled at; KeyError if absent."""
        cdef Py_ssize_t s = self._find(key)
        if s < 0:
            raise KeyError(key)
        return self._heap[self._slots[s].pos].a
