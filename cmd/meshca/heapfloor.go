package main

import (
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync/atomic"
)

// heapFloor keeps the garbage collector's heap goal at or above a floor.
//
// A CA's live heap is small (tens of MiB) while it allocates about 25 KB
// per certificate, so with GOGC=100 the collector runs several times a
// second under load and costs about a tenth of the CPU. After every
// collection heapFloor sets GOGC so that the next goal is
// max(2 × live heap, floor): a small heap gets room up to the floor, and
// a large one (10,000 SDS streams) is collected exactly as with GOGC=100.
// Memory use is therefore bounded by the floor or by what GOGC=100 uses,
// whichever is larger. GOMEMLIMIT, when set, still caps it.
type heapFloor struct {
	floor   uint64
	stopped atomic.Bool
	sample  []metrics.Sample
}

// startHeapFloor starts keeping the floor (bytes) and returns a function
// that stops it and restores GOGC=100. It does nothing, and says so with
// false, when floor is 0 or the operator set GOGC, which then wins.
func startHeapFloor(floor uint64) (stop func(), on bool) {
	if floor == 0 || os.Getenv("GOGC") != "" {
		return func() {}, false
	}
	h := &heapFloor{floor: floor, sample: []metrics.Sample{{Name: "/gc/heap/live:bytes"}}}
	h.adjust()
	h.arm()
	return func() {
		h.stopped.Store(true)
		debug.SetGCPercent(100)
	}, true
}

// arm registers adjust to run after the next collection: the runtime runs
// a cleanup once the object it is attached to has been found unreachable,
// which happens in the first cycle after arm returns.
func (h *heapFloor) arm() {
	runtime.AddCleanup(new([64]byte), func(h *heapFloor) {
		if h.stopped.Load() {
			return
		}
		h.adjust()
		h.arm()
	}, h)
}

func (h *heapFloor) adjust() {
	metrics.Read(h.sample)
	if h.sample[0].Value.Kind() != metrics.KindUint64 {
		return
	}
	debug.SetGCPercent(gcPercentFor(h.sample[0].Value.Uint64(), h.floor))
}

// gcPercentFor is the GOGC that puts the heap goal, live × (1 + GOGC/100),
// at floor, and never below Go's default of 100.
func gcPercentFor(live, floor uint64) int {
	if live == 0 {
		live = 1 << 20
	}
	if live*2 >= floor {
		return 100
	}
	p := (float64(floor)/float64(live) - 1) * 100
	return int(math.Min(p, 1e6))
}
