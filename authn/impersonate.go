package authn

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrImpersonationDenied is wrapped by every *ImpersonationError: a caller
// asked for a certificate of another identity and may not have it.
var ErrImpersonationDenied = errors.New("impersonation denied")

// Reasons an impersonation was refused. With ReasonUnavailable they are the
// results of the impersonation metric besides "allowed", and audit reasons,
// so they share no value with the authentication and CSR reasons.
const (
	// ReasonImpersonationOff: meshca trusts no node agent.
	ReasonImpersonationOff = "impersonation_off"
	// ReasonUntrustedNodeAgent: the caller is not a trusted node agent.
	ReasonUntrustedNodeAgent = "untrusted_node_agent"
	// ReasonBadIdentity: the asked identity is not a service account's
	// SPIFFE ID in meshca's trust domain.
	ReasonBadIdentity = "bad_impersonated_identity"
	// ReasonNoNode: the caller's credential names no node.
	ReasonNoNode = "no_node"
	// ReasonCallerPodGone: the caller's own pod is not (or no longer) on
	// the node its token names.
	ReasonCallerPodGone = "caller_pod_not_on_node"
	// ReasonNotOnNode: no pod of the asked identity runs on the caller's
	// node.
	ReasonNotOnNode = "identity_not_on_node"
)

// ImpersonationError is a refused impersonation. Its message names what was
// refused and is safe to return to the client.
type ImpersonationError struct {
	// Reason is one of the Reason constants above.
	Reason string
	// Detail says what was refused.
	Detail string
}

func (e *ImpersonationError) Error() string { return "impersonation denied: " + e.Detail }

// Unwrap makes every *ImpersonationError match ErrImpersonationDenied.
func (e *ImpersonationError) Unwrap() error { return ErrImpersonationDenied }

func denyImpersonation(reason, format string, args ...any) *ImpersonationError {
	return &ImpersonationError{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// ImpersonationOff is the refusal when no node agent is trusted at all.
func ImpersonationOff(caller *Caller) *ImpersonationError {
	return denyImpersonation(ReasonImpersonationOff, "%s may not request certificates for other identities: meshca trusts no node agent (authn.trustedNodeAgents is empty)", caller.ID)
}

// Pod is what a PodLocator knows of a pod.
type Pod struct {
	UID            string
	NodeName       string
	ServiceAccount string
}

// A PodLocator tells which pods are scheduled where. It must be fast and
// safe for concurrent use; it answers an error wrapping ErrUnavailable when
// it cannot tell yet.
type PodLocator interface {
	// Pod returns pod namespace/name, found=false if it does not exist.
	Pod(namespace, name string) (pod Pod, found bool, err error)
	// ServiceAccountOnNode reports whether a pod running as service
	// account namespace/serviceAccount is scheduled on node.
	ServiceAccountOnNode(node, namespace, serviceAccount string) (bool, error)
}

// ServiceAccountName is a service account's namespace and name.
type ServiceAccountName struct {
	Namespace, Name string
}

func (n ServiceAccountName) String() string { return n.Namespace + "/" + n.Name }

// ParseServiceAccountName splits "namespace/name". It checks the shape only;
// the configuration checks the names against Kubernetes' rules.
func ParseServiceAccountName(s string) (ServiceAccountName, error) {
	ns, name, ok := strings.Cut(s, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return ServiceAccountName{}, fmt.Errorf("%q: want namespace/serviceaccount", s)
	}
	return ServiceAccountName{Namespace: ns, Name: name}, nil
}

// NodeAuthorizerConfig configures a NodeAuthorizer.
type NodeAuthorizerConfig struct {
	// TrustDomain is the only trust domain whose identities may be
	// impersonated. Required.
	TrustDomain spiffeid.TrustDomain
	// Trusted lists the service accounts of the node agents (ztunnel) that
	// may impersonate, "namespace/name". At least one is required.
	Trusted []string
	// Pods tells which pods run on which node. Required.
	Pods PodLocator
}

// maxIdentityBytes bounds an asked identity: the SPIFFE specification's
// limit on a SPIFFE ID's URI.
const maxIdentityBytes = 2048

// NodeAuthorizer decides whether a node agent may have a certificate for
// another identity, as istiod's node authorizer does for ztunnel: the
// caller's service account must be a trusted node agent's, its token must
// be bound to its own pod on a node, and a pod of the asked service account
// must be scheduled on that same node. It is safe for concurrent use.
type NodeAuthorizer struct {
	td      spiffeid.TrustDomain
	trusted map[ServiceAccountName]bool
	pods    PodLocator
}

// NewNodeAuthorizer checks cfg and returns a NodeAuthorizer.
func NewNodeAuthorizer(cfg NodeAuthorizerConfig) (*NodeAuthorizer, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("node authorizer: TrustDomain is required")
	}
	if cfg.Pods == nil {
		return nil, errors.New("node authorizer: Pods is required")
	}
	if len(cfg.Trusted) == 0 {
		return nil, errors.New("node authorizer: at least one trusted node agent is required")
	}
	trusted := make(map[ServiceAccountName]bool, len(cfg.Trusted))
	for _, s := range cfg.Trusted {
		n, err := ParseServiceAccountName(s)
		if err != nil {
			return nil, fmt.Errorf("node authorizer: trusted node agent %w", err)
		}
		trusted[n] = true
	}
	return &NodeAuthorizer{td: cfg.TrustDomain, trusted: trusted, pods: cfg.Pods}, nil
}

// Impersonate returns the Caller that caller may act as when it asks for
// identity, a SPIFFE ID: the impersonated service account, authenticated by
// caller's authenticator, on caller's node. A refusal is an
// *ImpersonationError; an error wrapping ErrUnavailable means the pods are
// not known yet.
//
// The checks run in an order that tells a caller that is not a node agent
// nothing about the cluster's pods.
func (a *NodeAuthorizer) Impersonate(caller *Caller, identity string) (*Caller, error) {
	self := ServiceAccountName{Namespace: caller.Namespace, Name: caller.ServiceAccount}
	if !a.trusted[self] {
		return nil, denyImpersonation(ReasonUntrustedNodeAgent, "%s is not a trusted node agent (authn.trustedNodeAgents); only node agents such as ztunnel may request certificates for other identities", caller.ID)
	}
	id, asked, err := a.parseIdentity(identity)
	if err != nil {
		return nil, err
	}
	if caller.NodeName == "" || caller.PodName == "" {
		return nil, denyImpersonation(ReasonNoNode, "the credential of %s names no node; impersonation needs the node agent's service-account token bound to its pod on a node (client certificates and tokens not bound to a scheduled pod carry none)", caller.ID)
	}
	node := caller.NodeName
	pod, found, err := a.pods.Pod(caller.Namespace, caller.PodName)
	if err != nil {
		return nil, fmt.Errorf("look up the caller's pod: %w", err)
	}
	if !found || pod.UID != caller.PodUID || pod.NodeName != node || pod.ServiceAccount != caller.ServiceAccount {
		return nil, denyImpersonation(ReasonCallerPodGone, "the caller's pod %s/%s is not on node %q as its token says (deleted, re-created, or not yet seen by meshca's pod watch)", caller.Namespace, caller.PodName, node)
	}
	on, err := a.pods.ServiceAccountOnNode(node, asked.Namespace, asked.Name)
	if err != nil {
		return nil, fmt.Errorf("look up pods on node %q: %w", node, err)
	}
	if !on {
		return nil, denyImpersonation(ReasonNotOnNode, "no pod of service account %s (%s) is scheduled on node %q, the caller's node", asked, identity, node)
	}
	return &Caller{
		ID:             id,
		Namespace:      asked.Namespace,
		ServiceAccount: asked.Name,
		NodeName:       node,
		Authenticator:  caller.Authenticator,
		ExpiresAt:      caller.ExpiresAt,
	}, nil
}

// parseIdentity checks that identity is exactly
// spiffe://<trust domain>/ns/<namespace>/sa/<name>, in canonical form.
func (a *NodeAuthorizer) parseIdentity(identity string) (spiffeid.ID, ServiceAccountName, error) {
	if len(identity) > maxIdentityBytes {
		return spiffeid.ID{}, ServiceAccountName{}, denyImpersonation(ReasonBadIdentity, "ImpersonatedIdentity is %d bytes; a SPIFFE ID has at most %d", len(identity), maxIdentityBytes)
	}
	want := "spiffe://" + a.td.Name() + "/ns/<namespace>/sa/<serviceaccount>"
	id, err := spiffeid.FromString(identity)
	if err != nil || id.String() != identity {
		return spiffeid.ID{}, ServiceAccountName{}, denyImpersonation(ReasonBadIdentity, "ImpersonatedIdentity %q is not a SPIFFE ID; want %s", identity, want)
	}
	if id.TrustDomain() != a.td {
		return spiffeid.ID{}, ServiceAccountName{}, denyImpersonation(ReasonBadIdentity, "ImpersonatedIdentity %q is in trust domain %q; meshca issues only in %q", identity, id.TrustDomain().Name(), a.td.Name())
	}
	seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" || seg[1] == "" || seg[3] == "" {
		return spiffeid.ID{}, ServiceAccountName{}, denyImpersonation(ReasonBadIdentity, "ImpersonatedIdentity %q is not a service account's identity; want %s", identity, want)
	}
	return id, ServiceAccountName{Namespace: seg[1], Name: seg[3]}, nil
}
