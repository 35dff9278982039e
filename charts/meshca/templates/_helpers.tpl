{{/*
meshca.fullname is the name of every namespaced object, and the Service
name istio-agent dials.
*/}}
{{- define "meshca.fullname" -}}
{{- default "meshca" .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
meshca.clusterName prefixes cluster-scoped objects, which must not collide
between releases in different namespaces.
*/}}
{{- define "meshca.clusterName" -}}
{{- printf "%s-%s" (include "meshca.fullname" .) .Release.Namespace | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshca.selectorLabels" -}}
app.kubernetes.io/name: meshca
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meshca.labels" -}}
{{ include "meshca.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: certificate-authority
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "meshca.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshca.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "meshca.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Fixed paths and ports: the config, the mounts and the Service agree on them. */}}
{{- define "meshca.grpcPort" -}}15012{{- end -}}
{{- define "meshca.adminPort" -}}15014{{- end -}}
{{- define "meshca.policyDir" -}}/etc/meshca/policy{{- end -}}
{{- define "meshca.cacertsDir" -}}/etc/cacerts{{- end -}}
{{- define "meshca.dataDir" -}}/var/lib/meshca{{- end -}}
{{- define "meshca.vaultDir" -}}/etc/meshca/vault{{- end -}}
{{- define "meshca.vaultTokenFile" -}}/var/run/secrets/meshca/vault/token{{- end -}}

{{- define "meshca.backendType" -}}
{{- $b := .Values.config.backend | default dict -}}
{{- default "selfsigned" $b.type -}}
{{- end -}}

{{/*
meshca.vaultSecret is vault.secretName when the vault backend is used, ""
otherwise: the Secret mounted at meshca.vaultDir. It refuses a vault
configuration that reads a file from that directory when no Secret is set.
*/}}
{{- define "meshca.vaultSecret" -}}
{{- if eq (include "meshca.backendType" .) "vault" -}}
{{- $name := (.Values.vault | default dict).secretName | default "" -}}
{{- $v := include "meshca.vaultValues" . | fromYaml -}}
{{- $auth := $v.auth | default dict -}}
{{- $files := dict
  "caCertFile" $v.caCertFile
  "auth.tokenFile" $auth.tokenFile
  "auth.appRole.secretIDFile" ($auth.appRole | default dict).secretIDFile -}}
{{- range $key := keys $files | sortAlpha -}}
{{- $f := get $files $key | default "" | toString -}}
{{- if and (not $name) (hasPrefix (printf "%s/" (include "meshca.vaultDir" $)) $f) -}}
{{- fail (printf "config.backend.vault.%s is %s, but vault.secretName is empty: set it to the Secret to mount at %s" $key $f (include "meshca.vaultDir" $)) -}}
{{- end -}}
{{- end -}}
{{- $name -}}
{{- end -}}
{{- end -}}

{{/* meshca.vaultValues is config.backend.vault as YAML ({} when unset). */}}
{{- define "meshca.vaultValues" -}}
{{- ((.Values.config.backend | default dict).vault | default dict) | toYaml -}}
{{- end -}}

{{/*
meshca.vaultProjectedToken is "true" when the chart mounts a projected
service-account token for Vault's Kubernetes login: the vault backend with
auth.method kubernetes and no auth.kubernetes.tokenFile of its own.
*/}}
{{- define "meshca.vaultProjectedToken" -}}
{{- if eq (include "meshca.backendType" .) "vault" -}}
{{- $auth := (include "meshca.vaultValues" . | fromYaml).auth | default dict -}}
{{- if and (eq ($auth.method | default "" | toString) "kubernetes") (not ($auth.kubernetes | default dict).tokenFile) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "meshca.vaultTokenAudience" -}}
{{- required "vault.tokenAudience is required for Vault's Kubernetes login" ((.Values.vault | default dict).tokenAudience) -}}
{{- end -}}

{{- define "meshca.authnChain" -}}
{{- $a := .Values.config.authn | default dict -}}
{{- if kindIs "invalid" $a.chain -}}
{{- list "clientcert" "tokenreview" | toJson -}}
{{- else -}}
{{- $a.chain | toJson -}}
{{- end -}}
{{- end -}}

{{/*
meshca.trustedNodeAgents is authn.trustedNodeAgents with meshca's default
applied, as JSON: the chart grants list/watch on pods when it is not empty.
*/}}
{{- define "meshca.trustedNodeAgents" -}}
{{- $a := .Values.config.authn | default dict -}}
{{- if kindIs "invalid" $a.trustedNodeAgents -}}
{{- list "istio-system/ztunnel" | toJson -}}
{{- else -}}
{{- $a.trustedNodeAgents | toJson -}}
{{- end -}}
{{- end -}}

{{- define "meshca.checkServiceAccounts" -}}
{{- $a := .Values.config.authn | default dict -}}
{{- if kindIs "invalid" $a.checkServiceAccounts -}}true{{- else -}}{{ $a.checkServiceAccounts }}{{- end -}}
{{- end -}}

{{/*
meshca.replicas applies replicaCount's default and refuses several pods
that would each make their own selfsigned root. The other backends share a
root: the cacerts Secret, or the upstream's root under which each vault or
awspca pod holds its own intermediate.
*/}}
{{- define "meshca.replicas" -}}
{{- $type := include "meshca.backendType" . -}}
{{- $n := 1 -}}
{{- if not (kindIs "invalid" .Values.replicaCount) -}}
{{- $n = int .Values.replicaCount -}}
{{- else if has $type (list "plugged" "vault" "awspca") -}}
{{- $n = 2 -}}
{{- end -}}
{{- if and (eq $type "selfsigned") (gt $n 1) (ne .Values.persistence.type "pvc") -}}
{{- fail (printf "replicaCount %d with the selfsigned backend and persistence.type %q would give each pod its own root; use 1 replica, persistence.type pvc (ReadWriteMany), or the plugged backend" $n .Values.persistence.type) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{/*
meshca.durationSeconds turns a Go duration ("10s", "1m30s", "500ms") into
whole seconds, rounded up.
*/}}
{{- define "meshca.durationSeconds" -}}
{{- $d := toString . -}}
{{- $re := "[0-9]+(\\.[0-9]+)?(h|ms|m|s|us|µs|ns)" -}}
{{- if eq $d "0" -}}
0
{{- else if not (regexMatch (printf "^(%s)+$" $re) $d) -}}
{{- fail (printf "config.server.shutdownGrace: want a duration such as 10s, got %q" $d) -}}
{{- else -}}
{{- $unit := dict "h" 3600.0 "m" 60.0 "s" 1.0 "ms" 0.001 "us" 0.000001 "µs" 0.000001 "ns" 0.000000001 -}}
{{- $total := 0.0 -}}
{{- range regexFindAll $re $d -1 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" . -}}
{{- $total = addf $total (mulf (float64 $num) (get $unit (trimPrefix $num .))) -}}
{{- end -}}
{{- ceil $total | int -}}
{{- end -}}
{{- end -}}

{{- define "meshca.terminationGracePeriodSeconds" -}}
{{- $s := .Values.config.server | default dict -}}
{{- $grace := include "meshca.durationSeconds" (default "10s" $s.shutdownGrace) | int -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $grace 10 -}}
{{- else if le (int .Values.terminationGracePeriodSeconds) $grace -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than config.server.shutdownGrace (%ds), or the kubelet kills meshca before in-flight requests finish" (int .Values.terminationGracePeriodSeconds) $grace) -}}
{{- else -}}
{{- int .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/*
meshca.config renders meshca's config.yaml: values.config merged over the
keys the chart owns, which values.config must not set.
*/}}
{{- define "meshca.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $owned := list
  (list "server" "grpcAddress") (list "server" "adminAddress")
  (list "policy" "file") (list "authn" "kubeconfig")
  (list "backend" "plugged" "dir") (list "backend" "selfSigned" "dir")
  (list "dev") -}}
{{- range $path := $owned -}}
{{- $m := $cfg -}}
{{- range $i, $k := $path -}}
{{- if kindIs "map" $m -}}
{{- if and (eq (add1 $i) (len $path)) (hasKey $m $k) -}}
{{- fail (printf "config.%s is set by the chart; see the comment on config in values.yaml" (join "." $path)) -}}
{{- end -}}
{{- $m = get $m $k -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $name := include "meshca.fullname" . -}}
{{- $server := get $cfg "server" | default dict -}}
{{- $_ := set $server "grpcAddress" (printf ":%s" (include "meshca.grpcPort" .)) -}}
{{- $_ = set $server "adminAddress" (printf ":%s" (include "meshca.adminPort" .)) -}}
{{- if not $server.dnsNames -}}
{{- $_ = set $server "dnsNames" (list
  (printf "%s.%s.svc" $name .Release.Namespace)
  (printf "%s.%s.svc.%s" $name .Release.Namespace .Values.clusterDomain)) -}}
{{- end -}}
{{- $_ = set $cfg "server" $server -}}
{{- $policy := get $cfg "policy" | default dict -}}
{{- $_ = set $policy "file" (printf "%s/policy.yaml" (include "meshca.policyDir" .)) -}}
{{- $_ = set $cfg "policy" $policy -}}
{{- $backend := get $cfg "backend" | default dict -}}
{{- $type := include "meshca.backendType" . -}}
{{- $_ = set $backend "type" $type -}}
{{- if eq $type "plugged" -}}
{{- $plugged := get $backend "plugged" | default dict -}}
{{- $_ = set $plugged "dir" (include "meshca.cacertsDir" .) -}}
{{- $_ = set $backend "plugged" $plugged -}}
{{- else if and (eq $type "selfsigned") (ne .Values.persistence.type "none") -}}
{{- $ss := get $backend "selfSigned" | default dict -}}
{{- $_ = set $ss "dir" (include "meshca.dataDir" .) -}}
{{- $_ = set $backend "selfSigned" $ss -}}
{{- else if include "meshca.vaultProjectedToken" . -}}
{{- $vault := get $backend "vault" | default dict -}}
{{- $auth := get $vault "auth" | default dict -}}
{{- $k8s := get $auth "kubernetes" | default dict -}}
{{- $_ = set $k8s "tokenFile" (include "meshca.vaultTokenFile" .) -}}
{{- $_ = set $auth "kubernetes" $k8s -}}
{{- $_ = set $vault "auth" $auth -}}
{{- $_ = set $backend "vault" $vault -}}
{{- end -}}
{{- $_ = set $cfg "backend" $backend -}}
{{- toYaml $cfg -}}
{{- end -}}
