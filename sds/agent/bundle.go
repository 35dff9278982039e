package agent

import (
	"bytes"
	"crypto/x509"
	"slices"
	"time"
)

// rootSet is the trust bundle the keeper serves: the root of the latest
// response, and the roots it replaced, each kept until the last leaf issued
// under it expires.
type rootSet struct {
	current  *x509.Certificate
	previous []retiring
}

// retiring is a replaced root and when it leaves the bundle.
type retiring struct {
	cert  *x509.Certificate
	until time.Time
}

// use makes root the current root and reports whether that changed
// anything. A root it replaces stays until prevNotAfter, the NotAfter of
// the last leaf issued under it.
func (s *rootSet) use(root *x509.Certificate, prevNotAfter time.Time) bool {
	if s.current != nil && s.current.Equal(root) {
		return false
	}
	// A root that comes back (a rotation rolled back) is current again,
	// not retiring.
	s.previous = slices.DeleteFunc(s.previous, func(r retiring) bool { return r.cert.Equal(root) })
	if s.current != nil {
		s.previous = append(s.previous, retiring{cert: s.current, until: prevNotAfter})
	}
	s.current = root
	return true
}

// retire drops the replaced roots whose time is up at now, and returns
// them.
func (s *rootSet) retire(now time.Time) []*x509.Certificate {
	var dropped []*x509.Certificate
	s.previous = slices.DeleteFunc(s.previous, func(r retiring) bool {
		if now.Before(r.until) {
			return false
		}
		dropped = append(dropped, r.cert)
		return true
	})
	return dropped
}

// nextRetirement returns when the next replaced root leaves the bundle,
// zero if none is left.
func (s *rootSet) nextRetirement() time.Time {
	var next time.Time
	for _, r := range s.previous {
		if next.IsZero() || r.until.Before(next) {
			next = r.until
		}
	}
	return next
}

// roots returns a new slice of every root in the bundle, sorted by DER, so
// that the same set always comes in the same order.
func (s *rootSet) roots() []*x509.Certificate {
	if s.current == nil {
		return nil
	}
	out := make([]*x509.Certificate, 0, 1+len(s.previous))
	out = append(out, s.current)
	for _, r := range s.previous {
		out = append(out, r.cert)
	}
	slices.SortFunc(out, func(a, b *x509.Certificate) int { return bytes.Compare(a.Raw, b.Raw) })
	return out
}
