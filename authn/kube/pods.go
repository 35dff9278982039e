package kube

import (
	"fmt"
	"log/slog"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	toolscache "k8s.io/client-go/tools/cache"

	"github.com/meshca/meshca/authn"
)

// nodeServiceAccountIndex is the name of the PodIndex's index: node name,
// namespace and service account of every scheduled pod.
const nodeServiceAccountIndex = "node+serviceaccount"

// PodIndex is an authn.PodLocator backed by a client-go shared informer on
// the Pods of all namespaces, indexed by node and service account. It keeps
// only each pod's namespace, name, UID, node and service account in memory.
//
// It answers from the informer's view, which trails the apiserver by the
// watch latency: a pod scheduled just now may not be on its node yet here.
type PodIndex struct {
	watch
}

// NewPodIndex returns an index that lists and watches Pods through client
// once Run is called. log may be nil.
func NewPodIndex(client kubernetes.Interface, log *slog.Logger) *PodIndex {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	inf := coreinformers.NewPodInformer(client, metav1.NamespaceAll, 0, toolscache.Indexers{
		nodeServiceAccountIndex: indexNodeServiceAccount,
	})
	// These setters only fail once the informer has started.
	_ = inf.SetTransform(stripPod)
	_ = inf.SetWatchErrorHandler(func(_ *toolscache.Reflector, err error) {
		// The reflector retries with backoff; until its first list
		// succeeds, lookups answer ErrUnavailable.
		log.Warn("cannot list or watch pods", "error", err)
	})
	return &PodIndex{watch: watch{informer: inf, log: log, what: "pods"}}
}

// stripPod keeps only what the index needs: a cluster's pod specs and
// statuses are far too large to hold for five fields.
func stripPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown tombstone
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace:       pod.Namespace,
			Name:            pod.Name,
			UID:             pod.UID,
			ResourceVersion: pod.ResourceVersion,
		},
		Spec: corev1.PodSpec{NodeName: pod.Spec.NodeName, ServiceAccountName: pod.Spec.ServiceAccountName},
	}, nil
}

func nodeServiceAccountKey(node, namespace, serviceAccount string) string {
	// None of the three may contain a slash.
	return node + "/" + namespace + "/" + serviceAccount
}

// indexNodeServiceAccount indexes a scheduled pod under its node, namespace
// and service account; unscheduled pods are on no node.
func indexNodeServiceAccount(obj any) ([]string, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.NodeName == "" || pod.Spec.ServiceAccountName == "" {
		return nil, nil
	}
	return []string{nodeServiceAccountKey(pod.Spec.NodeName, pod.Namespace, pod.Spec.ServiceAccountName)}, nil
}

// Pod implements authn.PodLocator. Before the first full list it returns an
// error wrapping authn.ErrUnavailable.
func (x *PodIndex) Pod(namespace, name string) (authn.Pod, bool, error) {
	if !x.HasSynced() {
		return authn.Pod{}, false, fmt.Errorf("%w: pod index not synced yet", authn.ErrUnavailable)
	}
	obj, found, err := x.informer.GetStore().GetByKey(namespace + "/" + name)
	if err != nil {
		return authn.Pod{}, false, fmt.Errorf("%w: look up pod: %w", authn.ErrUnavailable, err)
	}
	if !found {
		return authn.Pod{}, false, nil
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return authn.Pod{}, false, fmt.Errorf("%w: look up pod: unexpected %T in index", authn.ErrUnavailable, obj)
	}
	return authn.Pod{UID: string(pod.UID), NodeName: pod.Spec.NodeName, ServiceAccount: pod.Spec.ServiceAccountName}, true, nil
}

// ServiceAccountOnNode implements authn.PodLocator. Before the first full
// list it returns an error wrapping authn.ErrUnavailable.
func (x *PodIndex) ServiceAccountOnNode(node, namespace, serviceAccount string) (bool, error) {
	if !x.HasSynced() {
		return false, fmt.Errorf("%w: pod index not synced yet", authn.ErrUnavailable)
	}
	keys, err := x.informer.GetIndexer().IndexKeys(nodeServiceAccountIndex, nodeServiceAccountKey(node, namespace, serviceAccount))
	if err != nil {
		return false, fmt.Errorf("%w: look up pods on node: %w", authn.ErrUnavailable, err)
	}
	return len(keys) > 0, nil
}

var _ authn.PodLocator = (*PodIndex)(nil)
