{{/* The chart's name, overridable. */}}
{{- define "swapper-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's resource name: 63 characters at most, as DNS labels allow. */}}
{{- define "swapper-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "swapper-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "swapper-gateway.labels" -}}
helm.sh/chart: {{ include "swapper-gateway.chart" . }}
{{ include "swapper-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "swapper-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "swapper-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "swapper-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "swapper-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Redis: the in-chart one's name and labels. */}}
{{- define "swapper-gateway.redis.fullname" -}}
{{- printf "%s-redis" (include "swapper-gateway.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "swapper-gateway.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "swapper-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "swapper-gateway.redis.labels" -}}
helm.sh/chart: {{ include "swapper-gateway.chart" . }}
{{ include "swapper-gateway.redis.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Redis URL the gateway uses: the in-chart Redis, the external one, or none. */}}
{{- define "swapper-gateway.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "swapper-gateway.redis.fullname" .) }}
{{- else }}
{{- .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{/* The gateway's config: values.config with the Redis URL filled in. */}}
{{- define "swapper-gateway.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $url := include "swapper-gateway.redisUrl" . }}
{{- if $url }}
{{- $_ := set $config "cache" (merge (dict "redis_url" $url) (default dict $config.cache)) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The Secret holding the API keys, if any. */}}
{{- define "swapper-gateway.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if or .Values.apiKeys.keys .Values.apiKeys.adminKey }}
{{- printf "%s-api-keys" (include "swapper-gateway.fullname" .) }}
{{- end }}
{{- end }}

{{/* Refuse values that would cut streams or split the cache and swaps between replicas. */}}
{{- define "swapper-gateway.validate" -}}
{{- $grace := default 30 (default dict .Values.config.server).shutdown_grace_s }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) (addf $grace .Values.preStopSleepSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds (%v) + config.server.shutdown_grace_s (%v)" .Values.terminationGracePeriodSeconds .Values.preStopSleepSeconds $grace) }}
{{- end }}
{{- if and (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) (not (include "swapper-gateway.redisUrl" .)) }}
{{- fail "several replicas need Redis to share the cache and coordinate swaps: set redis.enabled or externalRedis.url" }}
{{- end }}
{{- end }}
