{{- define "keyspaces-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyspaces-proxy.fullname" -}}
{{- printf "%s-%s" .Release.Name (include "keyspaces-proxy.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyspaces-proxy.serviceAccountName" -}}
{{- default (include "keyspaces-proxy.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "keyspaces-proxy.labels" -}}
app.kubernetes.io/name: {{ include "keyspaces-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "keyspaces-proxy.selector" -}}
app.kubernetes.io/name: {{ include "keyspaces-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* In sidecar mode .Chart is the application's chart: its appVersion is not the proxy's. */ -}}
{{- define "keyspaces-proxy.image" -}}
{{- if eq .Values.mode "sidecar" -}}
{{ .Values.image.repository }}:{{ required "image.tag is required in sidecar mode (the including chart's appVersion is not the proxy's)" .Values.image.tag }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/*
The proxy container. Shared mode listens on all interfaces with client authentication; the
sidecar stays on the pod's loopback, where only its own application can reach it.
Use from an application chart (a native sidecar, Kubernetes 1.29+):
  initContainers:
    {{- include "keyspaces-proxy.sidecar" (dict "Values" (index .Values "keyspaces-proxy") "Chart" .Chart "Release" .Release) | nindent 4 }}
*/}}
{{- define "keyspaces-proxy.container" -}}
- name: keyspaces-proxy
  image: {{ include "keyspaces-proxy.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if eq .Values.mode "sidecar" }}
  restartPolicy: Always
  {{- end }}
  args:
    - --region={{ .Values.region }}
    {{- /* A sidecar serves one application: one thread. A shared deployment serves many. */}}
    {{- $threads := .Values.workerThreads }}
    {{- if kindIs "invalid" $threads }}{{ $threads = ternary 1 2 (eq .Values.mode "sidecar") }}{{ end }}
    - --worker-threads={{ $threads }}
    {{- /* The image's defaults bind metrics to 0.0.0.0: an IPv6 cluster probes the pod's IPv6. */}}
    - --metrics-listen={{ .Values.bindAddress | default "0.0.0.0" }}:9464
    {{- if eq .Values.mode "shared" }}
    - --listen={{ .Values.bindAddress | default "0.0.0.0" }}:9042
    {{- if eq (.Values.clientAuth.mode | default "password") "mtls" }}
    - --client-auth=mtls
    {{- else }}
    - --client-auth=password
    - --client-credentials-file=/etc/keyspaces-proxy/users/users
    {{- end }}
    {{- if .Values.clientTls.existingSecret }}
    - --client-tls-cert=/etc/keyspaces-proxy/tls/tls.crt
    - --client-tls-key=/etc/keyspaces-proxy/tls/tls.key
    {{- end }}
    {{- if .Values.clientTls.clientCaSecret }}
    - --client-ca=/etc/keyspaces-proxy/client-ca/ca.crt
    {{- end }}
    {{- end }}
    {{- range .Values.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: RUST_LOG
      value: {{ .Values.logLevel | quote }}
    {{- if eq .Values.mode "shared" }}
    - name: KEYSPACES_PROXY_ADVERTISE_ADDRESS
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    {{- end }}
    {{- with .Values.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    {{- if eq .Values.mode "shared" }}
    - name: cql
      containerPort: 9042
    {{- end }}
    - name: metrics
      containerPort: 9464
  {{- if eq .Values.mode "sidecar" }}
  {{- /* A native sidecar's readiness counts toward its pod's: its probes follow the process
         only, or an AWS blip would pull the application out of its Services. */}}
  startupProbe:
    httpGet: {path: /livez, port: metrics}
    periodSeconds: 1
    failureThreshold: 30
  {{- else }}
  readinessProbe:
    httpGet: {path: /readyz, port: metrics}
    periodSeconds: 5
    failureThreshold: 6
  {{- end }}
  livenessProbe:
    httpGet: {path: /livez, port: metrics}
    periodSeconds: 10
  {{- if eq .Values.mode "shared" }}
  {{- /* SIGTERM closes the listener at once: wait until the Service has stopped routing
         here first (the sleep action needs no shell, which distroless has not). */}}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ .Values.preStopSeconds }}
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    runAsNonRoot: true
    capabilities:
      drop: ["ALL"]
  {{- if or (eq .Values.mode "shared") .Values.extraVolumeMounts }}
  volumeMounts:
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if eq .Values.mode "shared" }}
    {{- if ne (.Values.clientAuth.mode | default "password") "mtls" }}
    - name: users
      mountPath: /etc/keyspaces-proxy/users
      readOnly: true
    {{- end }}
    {{- if .Values.clientTls.existingSecret }}
    - name: tls
      mountPath: /etc/keyspaces-proxy/tls
      readOnly: true
    {{- end }}
    {{- if .Values.clientTls.clientCaSecret }}
    - name: client-ca
      mountPath: /etc/keyspaces-proxy/client-ca
      readOnly: true
    {{- end }}
    {{- end }}
  {{- end }}
{{- end -}}

{{- define "keyspaces-proxy.sidecar" -}}
{{- $values := merge (dict "mode" "sidecar") (deepCopy .Values) -}}
{{- include "keyspaces-proxy.container" (dict "Values" $values "Chart" .Chart "Release" .Release) -}}
{{- end -}}
