{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "gradalign.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or <release> when it already contains the chart name; leaves room for "-scheduler" */}}
{{- define "gradalign.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gradalign.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: include with (dict "root" $ "component" "scoring") ------------------------------- */}}

{{- define "gradalign.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gradalign.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gradalign.labels" -}}
helm.sh/chart: {{ include "gradalign.chart" .root }}
{{ include "gradalign.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: gradalign
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Object names ----------------------------------------------------------------------------- */}}

{{- define "gradalign.componentName" -}}
{{- printf "%s-%s" (include "gradalign.fullname" .root) .component -}}
{{- end -}}

{{- define "gradalign.schedulerServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-scheduler" (include "gradalign.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gradalign.workerServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- printf "%s-worker" (include "gradalign.fullname" .) -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gradalign.artifactsClaimName" -}}
{{- default (printf "%s-artifacts" (include "gradalign.fullname" .)) .Values.artifacts.existingClaim -}}
{{- end -}}

{{- define "gradalign.connectionsSecretName" -}}
{{- printf "%s-connections" (include "gradalign.fullname" .) -}}
{{- end -}}

{{- define "gradalign.authSecretName" -}}
{{- default (printf "%s-api-token" (include "gradalign.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Images: (dict "image" .Values.image "default" "0.1.0-cpu") ------------------------------ */}}

{{- define "gradalign.imageRef" -}}
{{- $ref := printf "%s:%s" .image.repository (default .default .image.tag) -}}
{{- if .image.digest -}}
{{- $ref = printf "%s@%s" $ref .image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{- define "gradalign.cpuImage" -}}
{{- include "gradalign.imageRef" (dict "image" .Values.image "default" (printf "%s-cpu" .Chart.AppVersion)) -}}
{{- end -}}

{{- define "gradalign.cudaImage" -}}
{{- include "gradalign.imageRef" (dict "image" .Values.cudaImage "default" (printf "%s-cuda" .Chart.AppVersion)) -}}
{{- end -}}

{{/* Connections ------------------------------------------------------------------------------ */}}

{{/* Fails the render when no database (or two) is configured. */}}
{{- define "gradalign.validateConnections" -}}
{{- $external := or .Values.externalDatabase.url .Values.externalDatabase.existingSecret -}}
{{- if and .Values.postgresql.enabled $external -}}
{{- fail "choose one database: postgresql.enabled=true (bundled, for a trial) or externalDatabase.url/existingSecret, not both" -}}
{{- end -}}
{{- if not (or .Values.postgresql.enabled $external) -}}
{{- fail "no database: set externalDatabase.url or externalDatabase.existingSecret, or postgresql.enabled=true for a trial" -}}
{{- end -}}
{{- if and .Values.externalDatabase.url .Values.externalDatabase.existingSecret -}}
{{- fail "set externalDatabase.url or externalDatabase.existingSecret, not both" -}}
{{- end -}}
{{- if and .Values.redis.enabled (or .Values.externalRedis.url .Values.externalRedis.existingSecret) -}}
{{- fail "choose one Redis: redis.enabled=true (bundled) or externalRedis.url/existingSecret, not both" -}}
{{- end -}}
{{- if and .Values.externalRedis.url .Values.externalRedis.existingSecret -}}
{{- fail "set externalRedis.url or externalRedis.existingSecret, not both" -}}
{{- end -}}
{{- end -}}

{{/* The scheduler's database and Redis variables (secretKeyRefs). */}}
{{- define "gradalign.connectionEnv" -}}
- name: GRADALIGN_SCHEDULER_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.externalDatabase.existingSecret }}
      name: {{ .Values.externalDatabase.existingSecret }}
      key: {{ .Values.externalDatabase.existingSecretKey }}
      {{- else }}
      name: {{ include "gradalign.connectionsSecretName" . }}
      key: database-url
      {{- end }}
{{- if .Values.externalRedis.existingSecret }}
- name: GRADALIGN_SCHEDULER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.existingSecretKey }}
{{- else if or .Values.redis.enabled .Values.externalRedis.url }}
- name: GRADALIGN_SCHEDULER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "gradalign.connectionsSecretName" . }}
      key: redis-url
{{- end }}
{{- end -}}

{{/* Volumes every GradAlign pod has: the artifact store, /tmp and $HOME. */}}
{{- define "gradalign.commonVolumes" -}}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "gradalign.artifactsClaimName" . }}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end -}}

{{- define "gradalign.commonVolumeMounts" -}}
- name: artifacts
  mountPath: {{ .Values.artifacts.mountPath }}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/gradalign
{{- end -}}

{{/* "NAME: value" settings -> env entries with a prefix: (dict "prefix" "GRADALIGN_SCORING_" "settings" $map) */}}
{{- define "gradalign.settingsEnv" -}}
{{- range $name, $value := .settings }}
- name: {{ printf "%s%s" $.prefix (upper $name) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* NetworkPolicy egress ---------------------------------------------------------------------- */}}

{{/* The egress rule to the cluster DNS (networkPolicy.dns), UDP and TCP 53. */}}
{{- define "gradalign.dnsEgress" -}}
# DNS
- to:
    {{- toYaml .Values.networkPolicy.dns.to | nindent 4 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end -}}

{{/* An egress rule from {to: [NetworkPolicyPeer...], ports: [TCP port...]}; none when `to` is empty
     (an egress rule without `to` would allow every destination). */}}
{{- define "gradalign.egressRule" -}}
{{- if .to -}}
- to:
    {{- toYaml .to | nindent 4 }}
  {{- with .ports }}
  ports:
    {{- range . }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- end }}
{{- end }}
{{- end -}}
