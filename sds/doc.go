// Package sds is reserved for meshca's Envoy SDS v3 server: proxies that
// hold a stream get their certificate, key and trust bundle pushed in
// memory, and pushed again at the policy's renewal point
// (ca.Effective.RenewFraction and RenewJitter, ca.RenewAt).
//
// It is not implemented yet; today meshca delivers certificates only
// through Istio's CreateCertificate (package ca/service).
package sds
