package ca

import (
	"math/rand/v2"
	"time"
)

// RenewAt returns when a certificate valid over [notBefore, notAfter] should
// be replaced: at fraction of its lifetime, moved earlier by a uniformly
// random amount in [0, jitter) so that a fleet issued together does not
// renew in one burst. The result is never before notBefore; fraction is
// clamped into (0, 1].
func RenewAt(notBefore, notAfter time.Time, fraction float64, jitter time.Duration) time.Time {
	if fraction <= 0 || fraction > 1 {
		fraction = 1
	}
	life := notAfter.Sub(notBefore)
	at := notBefore.Add(time.Duration(float64(life) * fraction))
	if jitter > 0 {
		at = at.Add(-rand.N(jitter))
	}
	if at.Before(notBefore) {
		at = notBefore
	}
	return at
}
