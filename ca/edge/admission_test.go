package edge

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
)

// TestAdmissionServesFirstCertificatesBeforeRenewals: with every slot
// taken, a freed slot goes to a waiting first certificate before a
// renewal that waited longer.
func TestAdmissionServesFirstCertificatesBeforeRenewals(t *testing.T) {
	a := NewAdmission(AdmissionConfig{MaxInFlight: 1, Queue: 8, QueueWait: 10 * time.Second})
	ctx := t.Context()
	release, err := a.Acquire(ctx, PriorityFirst)
	require.NoError(t, err)
	order := make(chan Priority, 2)
	waitQueued := func(n int) {
		require.Eventually(t, func() bool {
			a.mu.Lock()
			defer a.mu.Unlock()
			return len(a.waiting[PriorityFirst])+len(a.waiting[PriorityRenewal]) == n
		}, 5*time.Second, time.Millisecond)
	}
	for i, p := range []Priority{PriorityRenewal, PriorityFirst} {
		go func() {
			r, err := a.Acquire(ctx, p)
			if err == nil {
				order <- p
				r()
			}
		}()
		waitQueued(i + 1)
	}
	release()
	require.Equal(t, PriorityFirst, <-order)
	require.Equal(t, PriorityRenewal, <-order)
}

// TestAdmissionShedsRenewalsFirst: renewals may fill only half the queue;
// first certificates the rest. A full queue, or a wait past QueueWait, is
// ResourceExhausted with a retry hint, and counted.
func TestAdmissionShedsRenewalsFirst(t *testing.T) {
	m := NewAdmissionMetrics(nil)
	a := NewAdmission(AdmissionConfig{MaxInFlight: 1, Queue: 2, QueueWait: 200 * time.Millisecond, Metrics: m})
	ctx := t.Context()
	release, err := a.Acquire(ctx, PriorityFirst)
	require.NoError(t, err)
	defer release()
	done := make(chan error, 2)
	go func() { _, err := a.Acquire(ctx, PriorityRenewal); done <- err }()
	require.Eventually(t, func() bool { a.mu.Lock(); defer a.mu.Unlock(); return len(a.waiting[PriorityRenewal]) == 1 }, 5*time.Second, time.Millisecond)
	_, err = a.Acquire(ctx, PriorityRenewal)
	var se *ShedError
	require.ErrorAs(t, err, &se, "a second renewal finds its half of the queue full")
	require.Equal(t, "overload", se.Reason)
	go func() { _, err := a.Acquire(ctx, PriorityFirst); done <- err }()
	for range 2 {
		err := <-done
		require.ErrorIs(t, err, ErrShed, "the waits ran out")
	}
	require.Equal(t, 2.0, testutil.ToFloat64(m.Shed.WithLabelValues("overload", "renewal")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.Shed.WithLabelValues("overload", "first")))

	st := Status(err)
	require.Equal(t, codes.ResourceExhausted, st.Code())
	require.Contains(t, st.Message(), "retry after")
	var hint *errdetails.RetryInfo
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			hint = ri
		}
	}
	require.NotNil(t, hint, "the status carries a RetryInfo")
	require.Equal(t, 200*time.Millisecond, hint.RetryDelay.AsDuration())
	require.Equal(t, ReasonShed, Reason(err))
}

// TestAdmissionRatesApplyUnderLoad: a peer or identity beyond its rate is
// refused only while every slot is taken.
func TestAdmissionRatesApplyUnderLoad(t *testing.T) {
	a := NewAdmission(AdmissionConfig{MaxInFlight: 1, PeerRate: 1, PeerBurst: 2, IdentityRate: 1, IdentityBurst: 2})
	for range 10 {
		require.NoError(t, a.Peer("10.0.0.1", PriorityFirst), "idle: no refusal")
		require.NoError(t, a.Identity("spiffe://cluster.local/ns/a/sa/b", PriorityFirst))
	}
	release, err := a.Acquire(t.Context(), PriorityFirst)
	require.NoError(t, err)
	defer release()
	err = a.Peer("10.0.0.1", PriorityFirst)
	var se *ShedError
	require.ErrorAs(t, err, &se)
	require.Equal(t, "peer_rate", se.Reason)
	require.Positive(t, se.RetryAfter)
	require.NoError(t, a.Peer("10.0.0.2", PriorityFirst), "another peer has its own bucket")
	err = a.Identity("spiffe://cluster.local/ns/a/sa/b", PriorityRenewal)
	require.ErrorAs(t, err, &se)
	require.Equal(t, "identity_rate", se.Reason)
	require.NoError(t, a.Identity("spiffe://cluster.local/ns/a/sa/c", PriorityRenewal))
}

// TestAdmissionWaiterThatGivesUpFreesNothing: a cancelled waiter leaves
// the queue, and slots are neither lost nor duplicated.
func TestAdmissionWaiterThatGivesUpFreesNothing(t *testing.T) {
	a := NewAdmission(AdmissionConfig{MaxInFlight: 1, Queue: 4, QueueWait: 10 * time.Second})
	release, err := a.Acquire(t.Context(), PriorityFirst)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() { _, err := a.Acquire(ctx, PriorityFirst); errc <- err }()
	require.Eventually(t, func() bool { a.mu.Lock(); defer a.mu.Unlock(); return len(a.waiting[PriorityFirst]) == 1 }, 5*time.Second, time.Millisecond)
	cancel()
	require.True(t, errors.Is(<-errc, context.Canceled))
	release()
	a.mu.Lock()
	require.Zero(t, a.inFlight)
	a.mu.Unlock()
	r, err := a.Acquire(t.Context(), PriorityRenewal)
	require.NoError(t, err)
	r()
}

// TestAdmissionCapsRenewalsInFlight: while first certificates are being
// asked for, at most MaxRenewalsInFlight renewals run at once; a first
// certificate still starts at once beside them, and a freed renewal slot
// goes to the next renewal. Renewals alone, or once no first certificate
// came for FirstWindow, use every slot.
func TestAdmissionCapsRenewalsInFlight(t *testing.T) {
	a := NewAdmission(AdmissionConfig{MaxInFlight: 8, MaxRenewalsInFlight: 2, Queue: 16, QueueWait: 10 * time.Second, FirstWindow: time.Hour})
	var alone []func()
	for range 4 {
		r, err := a.Acquire(t.Context(), PriorityRenewal)
		require.NoError(t, err, "no first certificate asked for: renewals are not capped")
		alone = append(alone, r)
	}
	for _, r := range alone {
		r()
	}

	first, err := a.Acquire(t.Context(), PriorityFirst)
	require.NoError(t, err)
	var releases []func()
	for range 2 {
		r, err := a.Acquire(t.Context(), PriorityRenewal)
		require.NoError(t, err)
		releases = append(releases, r)
	}
	third := make(chan func(), 1)
	go func() {
		r, err := a.Acquire(t.Context(), PriorityRenewal)
		if err == nil {
			third <- r
		}
	}()
	require.Eventually(t, func() bool { a.mu.Lock(); defer a.mu.Unlock(); return len(a.waiting[PriorityRenewal]) == 1 }, 5*time.Second, time.Millisecond)

	second, err := a.Acquire(t.Context(), PriorityFirst)
	require.NoError(t, err, "a first certificate does not wait behind capped renewals")
	first()
	second()
	select {
	case <-third:
		t.Fatal("a freed first-certificate slot went to a renewal over its cap")
	case <-time.After(20 * time.Millisecond):
	}
	releases[0]()
	r := <-third
	a.mu.Lock()
	require.Equal(t, 2, a.renewing)
	require.Equal(t, 2, a.inFlight)
	a.mu.Unlock()
	r()
	releases[1]()
	a.mu.Lock()
	require.Zero(t, a.inFlight)
	require.Zero(t, a.renewing)
	a.mu.Unlock()

	// The cap lifts once no first certificate came for FirstWindow.
	a.mu.Lock()
	a.cfg.FirstWindow = time.Millisecond
	a.mu.Unlock()
	time.Sleep(5 * time.Millisecond)
	for range 4 {
		r, err := a.Acquire(t.Context(), PriorityRenewal)
		require.NoError(t, err)
		defer r()
	}
}

// While first certificates are being asked for, at most MaxRenewalsQueued
// renewals wait; the next is refused at once with a retry hint. Without
// first certificates, renewals queue up to half the queue as before.
func TestAdmissionBoundsQueuedRenewals(t *testing.T) {
	reg := prometheus.NewRegistry()
	a := NewAdmission(AdmissionConfig{MaxInFlight: 2, MaxRenewalsInFlight: 1, MaxRenewalsQueued: 2, Queue: 16,
		QueueWait: 10 * time.Second, FirstWindow: time.Hour, Metrics: NewAdmissionMetrics(reg)})
	shed := func() float64 { return testutil.ToFloat64(a.cfg.Metrics.Shed.WithLabelValues("overload", "renewal")) }
	waiting := func(p Priority) int { a.mu.Lock(); defer a.mu.Unlock(); return len(a.waiting[p]) }
	held := make(chan func(), 16)
	inBackground := func(p Priority) {
		go func() {
			if r, err := a.Acquire(t.Context(), p); err == nil {
				held <- r
			}
		}()
	}
	next := func() func() {
		select {
		case r := <-held:
			return r
		case <-time.After(5 * time.Second):
			t.Fatal("no waiter got the freed slot")
			return nil
		}
	}

	// Renewals alone queue beyond MaxRenewalsQueued.
	r1, err := a.Acquire(t.Context(), PriorityRenewal)
	require.NoError(t, err)
	r2, err := a.Acquire(t.Context(), PriorityRenewal)
	require.NoError(t, err)
	for range 4 {
		inBackground(PriorityRenewal)
	}
	require.Eventually(t, func() bool { return waiting(PriorityRenewal) == 4 }, 5*time.Second, time.Millisecond)
	require.Zero(t, shed())

	// A first certificate is asked for (and waits: every slot is taken).
	// Now a renewal is refused at once, with the queue's wait as its hint.
	inBackground(PriorityFirst)
	require.Eventually(t, func() bool { return waiting(PriorityFirst) == 1 }, 5*time.Second, time.Millisecond)
	soon, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	_, err = a.Acquire(soon, PriorityRenewal)
	var se *ShedError
	require.ErrorAs(t, err, &se, "a renewal over MaxRenewalsQueued is refused at once")
	require.Equal(t, "overload", se.Reason)
	require.Equal(t, 10*time.Second, se.RetryAfter)
	require.Equal(t, 1.0, shed())

	// The queued renewals stay; the first certificate gets the first freed
	// slot, then renewals run one at a time and the queue drains.
	r2()
	first := next()
	r1()
	renewal := next()
	require.Equal(t, 3, waiting(PriorityRenewal))
	renewal()
	renewal = next()
	renewal()
	renewal = next()
	require.Equal(t, 1, waiting(PriorityRenewal))

	// Below the bound a renewal waits again instead of being refused.
	inBackground(PriorityRenewal)
	require.Eventually(t, func() bool { return waiting(PriorityRenewal) == 2 }, 5*time.Second, time.Millisecond)
	require.Equal(t, 1.0, shed())
	first()
	renewal()
}
