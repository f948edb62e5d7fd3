{{/* The KubeRay RayCluster of trainer.ray (templates/raycluster.yaml) ---------------------------- */}}

{{- define "gradalign.rayClusterName" -}}
{{- printf "%s-ray" (include "gradalign.fullname" .) -}}
{{- end -}}

{{/* The Job Submission API of the head: the Service KubeRay creates for it, <cluster>-head-svc. */}}
{{- define "gradalign.rayAddress" -}}
{{- printf "http://%s-head-svc.%s.svc:%v" (include "gradalign.rayClusterName" .) .Release.Namespace .Values.trainer.ray.dashboardPort -}}
{{- end -}}

{{/* A Ray pod: (dict "root" $ "group" .Values.trainer.ray.head "container" "ray-head" ["gpus" N]).
     KubeRay adds the `ray start` command; the CUDA image has Ray, verl and our package. */}}
{{- define "gradalign.rayPodSpec" -}}
{{- $root := .root -}}
{{- $group := .group -}}
{{- $gpus := int (default 0 .gpus) -}}
serviceAccountName: {{ include "gradalign.workerServiceAccountName" $root }}
# Ray's pods never call the Kubernetes API (no autoscaler)
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
containers:
  - name: {{ .container }}
    image: {{ include "gradalign.cudaImage" $root }}
    imagePullPolicy: {{ $root.Values.cudaImage.pullPolicy }}
    {{- if eq .container "ray-head" }}
    ports:
      - name: gcs-server
        containerPort: 6379
        protocol: TCP
      - name: dashboard
        containerPort: {{ $root.Values.trainer.ray.dashboardPort }}
        protocol: TCP
      - name: client
        containerPort: 10001
        protocol: TCP
    {{- end }}
    env:
      - name: RAY_USAGE_STATS_ENABLED
        value: "0"
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    {{- $resources := deepCopy ($group.resources | default (dict)) }}
    {{- if gt $gpus 0 }}
    {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $gpus) ($resources.limits | default (dict))) }}
    {{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" $gpus) ($resources.requests | default (dict))) }}
    {{- end }}
    resources:
      {{- toYaml $resources | nindent 6 }}
    volumeMounts:
      {{- include "gradalign.commonVolumeMounts" $root | nindent 6 }}
      {{- if $group.shmSize }}
      - name: shm
        mountPath: /dev/shm
      {{- end }}
volumes:
  {{- include "gradalign.commonVolumes" $root | nindent 2 }}
  {{- if $group.shmSize }}
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $group.shmSize }}
  {{- end }}
{{- with $group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
