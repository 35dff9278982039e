// Package sds is meshca's Envoy SDS v3 server: proxies that hold a stream
// get their certificate, private key and trust bundle pushed in memory, and
// pushed again at the policy's renewal point and whenever the trust bundle
// or the signing CA changes.
//
// It serves state-of-the-world, delta and fetch requests through
// go-control-plane's server, with one small cache per stream: a stream is
// authenticated when it opens, and what it can receive follows from that
// identity, never from the node ID the proxy declares.
//
// Two modes share the code. Central (Hub): inside meshca serve, each stream
// gets its own key, generated in memory, and certificates issued by the CA
// core. Agent: inside meshca agent, every stream on the pod's Unix socket is
// served the pod's one credential, from a Source.
package sds
