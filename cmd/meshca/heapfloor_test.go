package main

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"
)

func TestGCPercentFor(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		live, floor uint64
		want        int
	}{
		{live: 16 * mib, floor: 128 * mib, want: 700},
		{live: 32 * mib, floor: 128 * mib, want: 300},
		{live: 64 * mib, floor: 128 * mib, want: 100},  // 2 × live reaches the floor
		{live: 500 * mib, floor: 128 * mib, want: 100}, // a large heap: Go's default
		{live: 0, floor: 128 * mib, want: 12700},       // no sample yet: taken as 1 MiB
		{live: 1, floor: 1 << 40, want: 1e6},           // capped
		{live: 100 * mib, floor: 150 * mib, want: 100}, // never below 100
		{live: 40 * mib, floor: 100 * mib, want: 150},  // 40 × 2.5 = 100
	} {
		if got := gcPercentFor(tc.live, tc.floor); got != tc.want {
			t.Errorf("gcPercentFor(%d MiB, %d MiB) = %d, want %d", tc.live/mib, tc.floor/mib, got, tc.want)
		}
	}
}

func gogc(t *testing.T) uint64 {
	t.Helper()
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// TestHeapFloorFollowsCollections shows the floor being applied, kept
// after collections, and given back on stop; and GOGC winning over it.
func TestHeapFloorFollowsCollections(t *testing.T) {
	t.Setenv("GOGC", "")
	stop, on := startHeapFloor(1 << 30)
	if !on {
		t.Fatal("startHeapFloor did not start with GOGC unset")
	}
	if got := gogc(t); got <= 100 {
		t.Fatalf("GOGC = %d after start with a 1 GiB floor, want more than 100", got)
	}
	// Every collection sets it again: knock it down, collect, and it is
	// back, cycle after cycle (the cleanup re-arms itself).
	for i := range 3 {
		debug.SetGCPercent(100)
		if !eventually(func() bool { runtime.GC(); return gogc(t) > 100 }) {
			t.Fatalf("GOGC stayed 100 after collection %d, want the floor applied again", i+1)
		}
	}
	stop()
	if got := gogc(t); got != 100 {
		t.Fatalf("GOGC = %d after stop, want 100", got)
	}
	// Stopped: a collection no longer raises it.
	runtime.GC()
	time.Sleep(20 * time.Millisecond)
	if got := gogc(t); got != 100 {
		t.Fatalf("GOGC = %d after a collection once stopped, want 100", got)
	}

	t.Setenv("GOGC", "50")
	if _, on := startHeapFloor(1 << 30); on {
		t.Fatal("startHeapFloor started although GOGC is set")
	}
	if got := gogc(t); got != 100 {
		t.Fatalf("GOGC = %d with GOGC set in the environment, want it left alone", got)
	}
}

// eventually polls cond for up to 2s: cleanups run on their own goroutine
// shortly after the collection that queues them.
func eventually(cond func() bool) bool {
	for range 100 {
		if cond() {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}
