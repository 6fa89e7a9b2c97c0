{{/*
The chart name, or nameOverride.
*/}}
{{- define "srdistill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name prefix of every resource: fullnameOverride, else the release name (plus the chart
name unless the release name already contains it), cut to 63 characters (a DNS label).
*/}}
{{- define "srdistill.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "srdistill.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "srdistill.labels" -}}
helm.sh/chart: {{ include "srdistill.chart" . }}
{{ include "srdistill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: srdistill
{{- end }}

{{/*
Labels that select the operator's pods (immutable in a Deployment: keep them stable).
*/}}
{{- define "srdistill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "srdistill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "srdistill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "srdistill.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image of the chart's repository: include "srdistill.image" (dict "ctx" $ "variant" "cpu")
gives <image.repository>:<image.tag or appVersion>-<variant>.
*/}}
{{- define "srdistill.image" -}}
{{- $image := .ctx.Values.image }}
{{- $repository := required "image.repository is required" $image.repository }}
{{- printf "%s:%s-%s" $repository (default .ctx.Chart.AppVersion $image.tag) .variant }}
{{- end }}

{{/*
The CPU image of Ray pods that name none: the chart's CPU image, or with ray.install runtimeEnv
Ray's stock image (srdistill.k8s.STOCK_IMAGE for rayCluster.rayVersion).
*/}}
{{- define "srdistill.rayCpuImage" -}}
{{- if eq .Values.ray.install "runtimeEnv" }}
{{- printf "rayproject/ray:%s-py311-cpu" .Values.rayCluster.rayVersion }}
{{- else }}
{{- include "srdistill.image" (dict "ctx" . "variant" "cpu") }}
{{- end }}
{{- end }}

{{/*
The Ray image of SRDistillations that name none (the operator's SRDISTILL_DEFAULT_IMAGE).
*/}}
{{- define "srdistill.defaultRayImage" -}}
{{- .Values.operator.defaultRayImage | default (include "srdistill.rayCpuImage" .) }}
{{- end }}

{{/*
How srdistill reaches the Ray pods, as the JSON of srdistill.k8s.Install (SRDISTILL_INSTALL).
*/}}
{{- define "srdistill.install" -}}
{{- $package := .Values.ray.package | default (printf "srdistill[cpu,synth]==%s" .Chart.AppVersion) }}
{{- dict "mode" .Values.ray.install "package" $package "torchCpuIndex" .Values.ray.torchCpuIndex | toJson }}
{{- end }}

{{/*
The standing RayCluster's name.
*/}}
{{- define "srdistill.rayClusterName" -}}
{{- default (printf "%s-ray" (include "srdistill.fullname" . | trunc 43 | trimSuffix "-")) .Values.rayCluster.name }}
{{- end }}

{{/*
A Ray pod template of the standing RayCluster. Arguments (a dict):
  ctx: the root context; container: ray-head or ray-worker; image; group: the values of the
  head or worker group (cpu, memory, optional gpu, nodeSelector, tolerations); head: true for the
  head (ports, autoscaler v2 switch); restartNever: true for autoscaler-v2 workers.
Pod and containers get ray.podSecurityContext and ray.securityContext ("restricted" by default,
with a writable root filesystem: Ray writes under its home); /dev/shm (object store) and /tmp
(Ray's session dir) are emptyDirs.
*/}}
{{- define "srdistill.rayPodTemplate" -}}
{{- $ray := .ctx.Values.rayCluster }}
{{- $group := .group }}
{{- $s3Secret := $ray.s3Secret | default .ctx.Values.operator.s3Secret -}}
metadata:
  labels:
    {{- include "srdistill.selectorLabels" .ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .container }}
  {{- with $ray.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  securityContext:
    {{- toYaml .ctx.Values.ray.podSecurityContext | nindent 4 }}
  {{- with $ray.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with .ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .restartNever }}
  # Autoscaler v2: a worker pod is never restarted in place (a new pod replaces it).
  restartPolicy: Never
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ .image }}
      imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
      {{- if .head }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
      {{- end }}
      resources:
        requests:
          cpu: {{ $group.cpu | quote }}
          memory: {{ $group.memory | quote }}
        limits:
          cpu: {{ $group.cpu | quote }}
          memory: {{ $group.memory | quote }}
          {{- with $group.gpu }}
          nvidia.com/gpu: {{ . }}
          {{- end }}
      {{- $autoscalerV2 := and .head $ray.autoscaling.enabled (eq $ray.autoscaling.version "v2") }}
      {{- if or $autoscalerV2 $ray.env }}
      env:
        {{- if $autoscalerV2 }}
        # Autoscaler v2 (KubeRay < 1.4 reads no autoscalerOptions.version).
        - name: RAY_enable_autoscaler_v2
          value: "1"
        {{- end }}
        {{- with $ray.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- with $s3Secret }}
      envFrom:
        - secretRef:
            name: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml .ctx.Values.ray.securityContext | nindent 8 }}
      volumeMounts:
        - name: shm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        {{- with $ray.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: shm
      emptyDir:
        medium: Memory
        {{- with $ray.shmSizeLimit }}
        sizeLimit: {{ . | quote }}
        {{- end }}
    - name: tmp
      emptyDir: {}
    {{- with $ray.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
A worker group of the standing RayCluster: include "srdistill.rayWorkerGroup" (dict "ctx" $
"group" <values> "image" <image>). Fails unless minReplicas <= replicas <= maxReplicas.
*/}}
{{- define "srdistill.rayWorkerGroup" -}}
{{- $group := .group }}
{{- $autoscaling := .ctx.Values.rayCluster.autoscaling }}
{{- if not (and (le (int $group.minReplicas) (int $group.replicas)) (le (int $group.replicas) (int $group.maxReplicas))) }}
{{- fail (printf "rayCluster worker group %q: need minReplicas (%v) <= replicas (%v) <= maxReplicas (%v)" $group.name $group.minReplicas $group.replicas $group.maxReplicas) }}
{{- end -}}
- groupName: {{ $group.name }}
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  rayStartParams: {}
  template:
    {{- $restartNever := and $autoscaling.enabled (eq $autoscaling.version "v2") }}
    {{- include "srdistill.rayPodTemplate" (dict "ctx" .ctx "container" "ray-worker" "image" .image "group" $group "restartNever" $restartNever) | nindent 4 }}
{{- end }}
