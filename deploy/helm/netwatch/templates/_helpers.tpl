{{/* The name objects start with: the release name when it already says netwatch. */}}
{{- define "netwatch.fullname" -}}
{{- if contains "netwatch" .Release.Name -}}
{{- .Release.Name | trunc 57 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-netwatch" .Release.Name | trunc 57 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels. app.kubernetes.io/name is also the Prometheus job name the rules expect. */}}
{{- define "netwatch.selectorLabels" -}}
app.kubernetes.io/name: netwatch-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "netwatch.labels" -}}
{{ include "netwatch.selectorLabels" . }}
app.kubernetes.io/part-of: netwatch
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "netwatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- printf "%s-agent" (include "netwatch.fullname" .) -}}
{{- else -}}
{{- required "serviceAccount.name: name the existing service account to use when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "netwatch.settingsConfigMapName" -}}
{{- if .Values.settingsConfigMap.create -}}
{{- printf "%s-agent" (include "netwatch.fullname" .) -}}
{{- else -}}
{{- required "settingsConfigMap.name: name the existing ConfigMap to read settings from when settingsConfigMap.create is false" .Values.settingsConfigMap.name -}}
{{- end -}}
{{- end -}}

{{/* The environment variable carrying one setting: log -> NETWATCH_LOG. */}}
{{- define "netwatch.settingEnv" -}}
{{- printf "NETWATCH_%s" (. | upper | replace "-" "_") -}}
{{- end -}}

{{/* Capabilities for .Values.nodeKernel (README "Security posture"). */}}
{{- define "netwatch.capabilities" -}}
{{- if eq .Values.nodeKernel "5.17+" -}}
[BPF, PERFMON, NET_ADMIN]
{{- else if eq .Values.nodeKernel "5.11-5.16" -}}
[BPF, PERFMON, NET_ADMIN, SYSLOG]
{{- else if eq .Values.nodeKernel "5.8-5.10" -}}
[BPF, PERFMON, NET_ADMIN, SYS_RESOURCE, SYSLOG]
{{- else if eq .Values.nodeKernel "pre-5.8" -}}
[SYS_ADMIN, NET_ADMIN, SYS_RESOURCE, SYSLOG]
{{- else -}}
{{- fail (printf "nodeKernel: %q is not one of \"5.17+\", \"5.11-5.16\", \"5.8-5.10\", \"pre-5.8\" (the kernel your nodes run; see values.yaml)" (toString .Values.nodeKernel)) -}}
{{- end -}}
{{- end -}}

{{- define "netwatch.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}
