package kube

import (
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	toolscache "k8s.io/client-go/tools/cache"

	"github.com/meshca/meshca/authn"
)

// ServiceAccountLookup is authn.ServiceAccountLookup, named here for the
// configurations of this package.
type ServiceAccountLookup = authn.ServiceAccountLookup

// ServiceAccountIndex is a ServiceAccountLookup backed by a client-go shared
// informer on the ServiceAccounts of all namespaces. It keeps only each
// account's namespace, name and UID in memory.
//
// It answers from the informer's view, which trails the apiserver by the
// watch latency (usually milliseconds): an account created just now may read
// as not found for that long.
type ServiceAccountIndex struct {
	watch
}

// NewServiceAccountIndex returns an index that lists and watches
// ServiceAccounts through client once Run is called. log may be nil.
func NewServiceAccountIndex(client kubernetes.Interface, log *slog.Logger) *ServiceAccountIndex {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	inf := coreinformers.NewServiceAccountInformer(client, metav1.NamespaceAll, 0, toolscache.Indexers{})
	// These setters only fail once the informer has started.
	_ = inf.SetTransform(stripServiceAccount)
	_ = inf.SetWatchErrorHandler(func(_ *toolscache.Reflector, err error) {
		// The reflector retries with backoff; until its first list
		// succeeds, ServiceAccountUID answers ErrUnavailable.
		log.Warn("cannot list or watch service accounts", "error", err)
	})
	return &ServiceAccountIndex{watch: watch{informer: inf, log: log, what: "service accounts"}}
}

// stripServiceAccount keeps only what the index needs: the token secrets and
// image-pull secrets of a large cluster are not worth holding.
func stripServiceAccount(obj any) (any, error) {
	sa, ok := obj.(*corev1.ServiceAccount)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown tombstone
	}
	return &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{
		Namespace:         sa.Namespace,
		Name:              sa.Name,
		UID:               sa.UID,
		ResourceVersion:   sa.ResourceVersion,
		CreationTimestamp: sa.CreationTimestamp,
	}}, nil
}

// ServiceAccountUID implements ServiceAccountLookup. Before the first full
// list it returns an error wrapping authn.ErrUnavailable.
func (x *ServiceAccountIndex) ServiceAccountUID(namespace, name string) (string, bool, error) {
	sa, found, err := x.get(namespace, name)
	if !found {
		return "", false, err
	}
	return string(sa.UID), true, nil
}

// ServiceAccountCreated implements authn.ServiceAccountCreation: when the
// service account (as it exists now) was created.
func (x *ServiceAccountIndex) ServiceAccountCreated(namespace, name string) (time.Time, bool, error) {
	sa, found, err := x.get(namespace, name)
	if !found {
		return time.Time{}, false, err
	}
	return sa.CreationTimestamp.Time, true, nil
}

// get looks up a service account in the index, once it has synced.
func (x *ServiceAccountIndex) get(namespace, name string) (*corev1.ServiceAccount, bool, error) {
	if !x.HasSynced() {
		return nil, false, fmt.Errorf("%w: service account index not synced yet", authn.ErrUnavailable)
	}
	obj, found, err := x.informer.GetStore().GetByKey(namespace + "/" + name)
	if err != nil {
		return nil, false, fmt.Errorf("%w: look up service account: %w", authn.ErrUnavailable, err)
	}
	if !found {
		return nil, false, nil
	}
	sa, ok := obj.(*corev1.ServiceAccount)
	if !ok {
		return nil, false, fmt.Errorf("%w: look up service account: unexpected %T in index", authn.ErrUnavailable, obj)
	}
	return sa, true, nil
}

// checkServiceAccount refuses a caller whose service account no longer
// exists, or exists with another UID than the one the token names. A nil
// lookup accepts everyone.
func checkServiceAccount(lookup ServiceAccountLookup, c *authn.Caller) error {
	return authn.CheckServiceAccount(lookup, c)
}
